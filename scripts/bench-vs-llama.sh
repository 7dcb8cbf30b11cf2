#!/usr/bin/env bash
# lfmd vs llama.cpp on the same file and threads, in one run:
#   scripts/bench-vs-llama.sh MODEL.gguf [THREADS] [PP] [TG] [-- extra llama-bench args, e.g. --repack 0]
# Prints both rates and lfmd/llama.cpp ratios for prefill (pp) and decode (tg).
# Builds lfmd into $CARGO_TARGET_DIR (default target/); LFMD=path runs that
# binary instead (say, a build of another commit).
# Needs the reference build: scripts/ref-noamx.sh on AVX-512 machines that advertise
# AMX, the native ../shared/reference/setup-llama.sh build on AVX2-only ones.
set -euo pipefail
cd "$(dirname "$0")/.."
MODEL=$1; T=${2:-2}; PP=${3:-512}; TG=${4:-128}
shift $(( $# < 4 ? $# : 4 )); [ "${1:-}" = "--" ] && shift
source ../shared/reference/env.sh
if [ -z "${LFMD:-}" ]; then
  cargo build --release --locked -p lfmd >/dev/null
  LFMD=${CARGO_TARGET_DIR:-target}/release/lfmd
fi
ours=$("$LFMD" bench --model "$MODEL" --threads "$T" -p "$PP" -n "$TG" --json)
theirs=$("$LLB/llama-bench" -m "$MODEL" -t "$T" -p "$PP" -n "$TG" -o json "$@" 2>/dev/null)
python3 - "$ours" "$theirs" <<'PY'
import json, sys
o = json.loads(sys.argv[1]); t = json.loads(sys.argv[2])
pp = next((r["avg_ts"] for r in t if r["n_prompt"] > 0 and r["n_gen"] == 0), 0.0)
tg = next((r["avg_ts"] for r in t if r["n_gen"] > 0 and r["n_prompt"] == 0), 0.0)
print(f"model {o['model']} ({o['model_bytes']/1e9:.2f} GB), {o['threads']} threads, lfmd isa {o['isa']}")
print(f"{'test':<8} {'lfmd tok/s':>12} {'llama.cpp':>12} {'ratio':>8}")
for name, ours, ref in [("prefill", o["prefill_tokens_per_s"], pp), ("decode", o["decode_tokens_per_s"], tg)]:
    print(f"{name:<8} {ours:>12.2f} {ref:>12.2f} {ours / ref if ref else float('nan'):>8.2f}")
PY
