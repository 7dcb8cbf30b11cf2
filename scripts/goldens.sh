#!/usr/bin/env bash
# Regenerates the llama.cpp goldens under daemon/engine/tests/goldens/llama/ from the
# reference build (scripts/ref-noamx.sh, or ../shared/reference/setup-llama.sh on a
# CPU without AMX). For every (preset, type) below it synthesizes the model, records
# its sha256, and asks llama.cpp to tokenize fixed texts and continue a prompt
# greedily. The tests check that `lfmd synth` still writes those exact bytes, so a
# golden proves llama.cpp loaded and ran that very file.
#   scripts/goldens.sh [--large]      # --large adds 350m and 8b-a1b (several GB, minutes)
set -euo pipefail
cd "$(dirname "$0")/.."
source ../shared/reference/env.sh
OUT=daemon/engine/tests/goldens/llama
WORK=${GOLDEN_WORK:-target/goldens}
mkdir -p "$OUT" "$WORK"
# Teacher-forced sequence: ids below 512 so it fits every preset's vocabulary.
FORCED=1,6,300,45,99,120,7,3,200,201,202,17,18,19,400,401,33,34,35,36,37,38,39,40,41,42,43,44,45,46,47,48
cargo build --release --locked -p lfmd
LFMD=target/release/lfmd
CASES="tiny-moe:f32 tiny-moe:f16 tiny-moe:bf16 tiny-moe:q8_0 tiny-moe:q4_0 tiny-moe:q4_1 tiny-moe:q5_0 tiny-moe:q5_1
       tiny-moe:q4_k tiny-moe:q5_k tiny-moe:q6_k tiny-moe:q4_k_m tiny-moe:q5_k_m
       tiny-dense:f32 tiny-dense:f16 tiny-dense:q8_0 tiny-dense:q4_0 tiny-dense:q6_k tiny-dense:q4_k_m"
[ "${1:-}" = "--large" ] && CASES="$CASES 350m:q8_0 8b-a1b:q4_0"
for c in $CASES; do
  preset=${c%%:*}; quant=${c##*:}
  f=$WORK/$preset-$quant.gguf
  "$LFMD" synth --preset "$preset" --quant "$quant" --seed 0 "$f"
  case "$quant" in
    q4_k_m|q5_k_m)
      # Our mixes must be exactly what llama-quantize makes of the f32 file.
      "$LFMD" synth --preset "$preset" --quant f32 --seed 0 "$WORK/src-f32.gguf"
      "$LLB/llama-quantize" "$WORK/src-f32.gguf" "$WORK/ref-$quant.gguf" "${quant^^}" >/dev/null 2>&1
      PYTHONPATH="$(echo "$LLAMA_CPP_LIB_PATH"/../../llama_cpp_python-*/vendor/llama.cpp/gguf-py)" \
        "$LLB/../../venv/bin/python" - "$WORK/ref-$quant.gguf" "$f" <<'PY'
import sys, gguf
a = {t.name: t for t in gguf.GGUFReader(sys.argv[1]).tensors}
b = {t.name: t for t in gguf.GGUFReader(sys.argv[2]).tensors}
bad = [n for n in a if n not in b or a[n].tensor_type != b[n].tensor_type or a[n].data.tobytes() != b[n].data.tobytes()]
if bad or len(a) != len(b):
    sys.exit(f"lfmd synth {sys.argv[2]} differs from llama-quantize in {bad[:5]}")
print(f"  {len(a)} tensors identical to llama-quantize's output")
PY
      ;;
  esac
  $REFPY greedy "$f" --ids 1,6,300,45,99 -n 16 > "$WORK/greedy.json"
  $REFPY logits "$f" --ids "$FORCED" --out "$WORK/forced.npy"
  : > "$WORK/tok.jsonl"
  while IFS= read -r text; do
    # The X keeps command substitution from eating trailing newlines.
    expanded=$(printf '%bX' "$text"); expanded=${expanded%X}
    printf '%s\t%s\n' "$text" "$($REFPY tokenize "$f" "$expanded")" >> "$WORK/tok.jsonl"
  done <<'TEXTS'
Hello world
<|im_start|>user\nWhat is 12345 + 678?<|im_end|>\n<|im_start|>assistant\n
 the quick brown fox   jumps\n\n\tover 3 lazy dogs!!! 
Ünïcödé — 日本語のテキスト, русский текст, 🦙🚀
<|tool_call_start|>[get_weather(city="Paris")]<|tool_call_end|>
TEXTS
  "$LLB/../../venv/bin/python" - "$preset" "$quant" "$f" "$WORK" "$OUT" "$FORCED" <<'PY'
import hashlib, json, os, sys
import numpy as np
preset, quant, f, work, out, forced = sys.argv[1:]
logits = np.load(os.path.join(work, "forced.npy"))
h = hashlib.sha256()
with open(f, "rb") as fh:
    for chunk in iter(lambda: fh.read(1 << 24), b""):
        h.update(chunk)
tok = []
for line in open(os.path.join(work, "tok.jsonl"), encoding="utf-8"):
    text, ids = line.rstrip("\n").split("\t")
    tok.append({"text": text.replace("\\n", "\n").replace("\\t", "\t"), "ids": json.loads(ids)})
golden = {
    "source": "llama.cpp vendored by llama-cpp-python 0.3.36 (scripts/goldens.sh)",
    "preset": preset, "quant": quant, "seed": 0,
    "file_bytes": os.path.getsize(f), "sha256": h.hexdigest(),
    "prompt_ids": [1, 6, 300, 45, 99],
    "greedy_ids": json.load(open(os.path.join(work, "greedy.json"))),
    "forced_ids": [int(x) for x in forced.split(",")],
    "forced_argmax": [int(x) for x in logits.argmax(1)],
    "tokenize": tok,
}
if os.path.getsize(f) < 256 << 20:
    # Teacher-forced logits of the small presets, raw little-endian f32 [positions][vocab].
    golden["forced_logits"] = f"{preset}-{quant}.logits.f32"
    golden["forced_logits_shape"] = list(logits.shape)
    logits.astype("<f4").tofile(os.path.join(out, golden["forced_logits"]))
with open(os.path.join(out, f"{preset}-{quant}.json"), "w") as o:
    json.dump(golden, o, indent=1, ensure_ascii=False)
    o.write("\n")
print(f"{preset}-{quant}: greedy {golden['greedy_ids']}")
PY
  case "$preset" in 350m|8b-a1b) rm -f "$f" ;; esac
done
