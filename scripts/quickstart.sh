#!/usr/bin/env bash
# The main job on a fresh machine: build, make (or take) a model, run it.
#   scripts/quickstart.sh [--model FILE.gguf]
# Today it builds lfmd, writes a small synthetic LFM2-MoE model when no model
# is given, describes it with `lfmd inspect` and answers a chat prompt with
# `lfmd generate` (a random model answers gibberish, at full speed). As the
# daemon lands, this script starts it as the current user and answers an
# `lfmctl ask`.
set -euo pipefail
cd "$(dirname "$0")/.."
MODEL=""
while [ $# -gt 0 ]; do
  case "$1" in
    --model) MODEL=$2; shift 2 ;;
    *) echo "usage: $0 [--model FILE.gguf]" >&2; exit 2 ;;
  esac
done
cargo build --release --locked -p lfmd -p lfmctl
LFMD=target/release/lfmd
if [ -z "$MODEL" ]; then
  MODEL=target/quickstart/tiny-moe-q8_0.gguf
  mkdir -p "$(dirname "$MODEL")"
  "$LFMD" synth --preset tiny-moe --quant q8_0 "$MODEL"
fi
"$LFMD" inspect "$MODEL" | sed -n '1,12p'
echo
echo "lfmd generate --chat 'What can you do?':"
"$LFMD" generate --model "$MODEL" --chat --max-tokens 48 "What can you do?"
