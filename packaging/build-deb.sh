#!/usr/bin/env bash
# Builds the lfmd .deb (both binaries, units, D-Bus files, sysusers/tmpfiles,
# /etc/lfmd/lfmd.toml, man pages): release binaries, man pages generated from
# their clap definitions (`lfmd man`, `lfmctl man`, hidden commands), then
# `cargo deb --no-build` with the metadata in daemon/Cargo.toml.
# Prints the .deb's path on the last line (a -dbgsym .ddeb is written beside it). Needs cargo-deb
# (`cargo install cargo-deb --locked`) and dpkg-dev.
set -euo pipefail
cd "$(dirname "$0")/.."

command -v cargo-deb >/dev/null || { echo "build-deb: cargo-deb missing: cargo install cargo-deb --locked" >&2; exit 1; }
if [ ! -f packaging/lfmd.toml ]; then
  echo "build-deb: packaging/lfmd.toml (the default /etc/lfmd/lfmd.toml) is missing" >&2
  exit 1
fi

cargo build --release --locked -p lfmd -p lfmctl >&2
target=$(cargo metadata --format-version 1 --no-deps --locked | sed -n 's/.*"target_directory":"\([^"]*\)".*/\1/p')
man=$target/release/man
rm -rf "$man"
"$target/release/lfmd" man --out "$man"
"$target/release/lfmctl" man --out "$man"
gzip -9n "$man"/*.1

# --no-build: cargo-deb alone would build only the lfmd crate, not lfmctl.
# --dbgsym: stripped binaries in the .deb (6 MB instead of 37 MB for lfmd),
# their line tables in lfmd-dbgsym_*.ddeb beside it.
cargo deb -p lfmd --no-build --locked --dbgsym --output "$target/debian" | grep '\.deb$'
