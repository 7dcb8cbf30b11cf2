#!/usr/bin/env bash
# lfmd vs llama.cpp on the same file and threads, in one run:
#   scripts/bench-vs-llama.sh MODEL.gguf [THREADS] [PP] [TG] [-- extra llama-bench args, e.g. --repack 0]
# Prints both rates and lfmd/llama.cpp ratios for prefill (pp) and decode (tg),
# and decode as a weight stream against the rate lfmd's threads read the
# mapping with no compute (decode's ceiling: see `lfmd bench`).
# DEPTH=D starts every test after D tokens of context (-d of both).
# ROUNDS=N (default 1) alternates the two programs N times and adds the median
# of each column and of the ratios: on a shared machine both drift with their
# neighbours by 10-20% within minutes, so one pair of runs proves little.
# Builds lfmd into $CARGO_TARGET_DIR (default target/); LFMD=path runs that
# binary instead (say, a build of another commit).
# Needs the reference build: scripts/ref-noamx.sh on AVX-512 machines that advertise
# AMX, the native ../shared/reference/setup-llama.sh build on AVX2-only ones.
set -euo pipefail
cd "$(dirname "$0")/.."
MODEL=$1; T=${2:-2}; PP=${3:-512}; TG=${4:-128}
shift $(( $# < 4 ? $# : 4 )); [ "${1:-}" = "--" ] && shift
ROUNDS=${ROUNDS:-1}
# DEPTH=D: every test starts after D tokens of context (both programs' -d).
DEPTH=${DEPTH:-0}
source ../shared/reference/env.sh
if [ -z "${LFMD:-}" ]; then
  cargo build --release --locked -p lfmd >/dev/null
  LFMD=${CARGO_TARGET_DIR:-target}/release/lfmd
fi
runs=()
for _ in $(seq "$ROUNDS"); do
  ours=$("$LFMD" bench --model "$MODEL" --threads "$T" -p "$PP" -n "$TG" -d "$DEPTH" --json)
  theirs=$("$LLB/llama-bench" -m "$MODEL" -t "$T" -p "$PP" -n "$TG" -d "$DEPTH" -o json "$@" 2>/dev/null)
  runs+=("$ours" "$theirs")
done
python3 - "${runs[@]}" <<'PY'
import json, statistics, sys
args = sys.argv[1:]
rows = []
for ours, theirs in zip(args[::2], args[1::2]):
    o = json.loads(ours); t = json.loads(theirs)
    pp = next((r["avg_ts"] for r in t if r["n_prompt"] > 0 and r["n_gen"] == 0), 0.0)
    tg = next((r["avg_ts"] for r in t if r["n_gen"] > 0 and r["n_prompt"] == 0), 0.0)
    rows.append((o, [("prefill", o["prefill_tokens_per_s"], pp), ("decode", o["decode_tokens_per_s"], tg)]))
o = rows[0][0]
depth = f", after {o['depth']} tokens of context" if o.get("depth") else ""
print(f"model {o['model']} ({o['model_bytes']/1e9:.2f} GB), {o['threads']} threads, lfmd isa {o['isa']}{depth}")
print(f"{'test':<10} {'lfmd tok/s':>12} {'llama.cpp':>12} {'ratio':>8}")
ratio = lambda a, b: a / b if b else float("nan")
for i, (_, tests) in enumerate(rows):
    for name, ours, ref in tests:
        tag = name if len(rows) == 1 else f"{name}#{i + 1}"
        print(f"{tag:<10} {ours:>12.2f} {ref:>12.2f} {ratio(ours, ref):>8.2f}")
if len(rows) > 1:
    med = statistics.median
    print(f"median of {len(rows)} rounds (ratio: the median of the rounds' ratios)")
    for k, name in enumerate(["prefill", "decode"]):
        ours = [t[k][1] for _, t in rows]
        ref = [t[k][2] for _, t in rows]
        rs = [ratio(a, b) for a, b in zip(ours, ref)]
        print(f"{name:<10} {med(ours):>12.2f} {med(ref):>12.2f} {med(rs):>8.2f}"
              f"  ({min(rs):.2f}-{max(rs):.2f})")
# Decode's roofline: both programs read the same weights per token, and
# lfmd measured (after its decode) how fast its threads read the mapping
# with no compute at all.
bytes_tok = o.get("decode_weight_bytes", 0)
reads = [r[0].get("read_gb_per_s", 0.0) for r in rows]
if bytes_tok and all(reads):
    print(f"decode reads {bytes_tok / 1e9:.3f} GB of weights per token; per round, GB/s "
          f"streamed and % of the pure-read rate of the mapping measured by lfmd after its decode:")
    for i, ((_, tests), read) in enumerate(zip(rows, reads)):
        ours, ref = tests[1][1] * bytes_tok / 1e9, tests[1][2] * bytes_tok / 1e9
        print(f"  round {i + 1}: lfmd {ours:.2f} ({100 * ours / read:.0f}%), llama.cpp {ref:.2f} "
              f"({100 * ref / read:.0f}%), pure read {read:.2f}; 1.3x llama.cpp would need "
              f"{130 * ref / read:.0f}%")
PY
