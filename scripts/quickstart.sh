#!/usr/bin/env bash
# The main job on a fresh machine: build, make (or take) a model, serve it,
# ask it something.
#   scripts/quickstart.sh [--model FILE.gguf] [PROMPT]
# Builds lfmd and lfmctl, writes a small synthetic LFM2-MoE model when no model
# is given (a random model answers gibberish, at full speed), starts
# `lfmd serve` as the current user on a private socket, waits until it
# answers, streams one `lfmctl ask`, shows `lfmctl status`, and stops the
# daemon (SIGTERM: it drains and removes its socket).
set -euo pipefail
cd "$(dirname "$0")/.."
MODEL=""
PROMPT="What can you do?"
while [ $# -gt 0 ]; do
  case "$1" in
    --model) [ $# -ge 2 ] || { echo "usage: $0 [--model FILE.gguf] [PROMPT]" >&2; exit 2; }
             MODEL=$2; shift 2 ;;
    -h|--help) echo "usage: $0 [--model FILE.gguf] [PROMPT]"; exit 0 ;;
    -*) echo "usage: $0 [--model FILE.gguf] [PROMPT]" >&2; exit 2 ;;
    *) PROMPT=$1; shift ;;
  esac
done
cargo build --release --locked -p lfmd -p lfmctl
LFMD=$PWD/target/release/lfmd
LFMCTL=$PWD/target/release/lfmctl
if [ -z "$MODEL" ]; then
  MODEL=target/quickstart/tiny-moe-q8_0.gguf
  mkdir -p "$(dirname "$MODEL")"
  "$LFMD" synth --preset tiny-moe --quant q8_0 "$MODEL"
fi
[ -f "$MODEL" ] || { echo "quickstart: no model at $MODEL" >&2; exit 2; }

# A private socket, so a daemon already running for this user is left alone.
RUN=$(mktemp -d "${XDG_RUNTIME_DIR:-${TMPDIR:-/tmp}}/lfmd-quickstart.XXXXXX")
SOCK=$RUN/lfmd.sock
export LFMD_SOCKET=$SOCK
echo "== lfmd serve --model $MODEL --grpc unix:$SOCK"
"$LFMD" serve --model "$MODEL" --grpc "unix:$SOCK" 2>"$RUN/lfmd.log" &
PID=$!
stop() {
  if kill -0 "$PID" 2>/dev/null; then
    kill -TERM "$PID" 2>/dev/null || true
    wait "$PID" 2>/dev/null || true
  fi
  rm -rf "$RUN"
}
trap stop EXIT
for _ in $(seq 1 300); do
  "$LFMCTL" status >/dev/null 2>&1 && break
  if ! kill -0 "$PID" 2>/dev/null; then
    echo "quickstart: lfmd exited:" >&2; cat "$RUN/lfmd.log" >&2; exit 1
  fi
  sleep 0.1
done
"$LFMCTL" info
echo
echo "== lfmctl ask '$PROMPT'"
"$LFMCTL" ask --max-tokens 48 "$PROMPT"
echo
echo "== lfmctl status"
"$LFMCTL" status
kill -TERM "$PID"
wait "$PID"
echo "== lfmd log"
cat "$RUN/lfmd.log"
