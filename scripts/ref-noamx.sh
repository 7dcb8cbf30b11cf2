#!/usr/bin/env bash
# Rebuilds the shared reference llama.cpp (../shared/reference/setup-llama.sh) with
# AVX-512/VNNI/BF16 but without AMX. On VMs that advertise AMX but cannot run it,
# GGML_NATIVE's AMX kernels die with SIGILL on quantized weights.
set -euo pipefail
ROOT=${LFM_REF_ROOT:-/tmp/lfm-ref}
HERE=$(cd "$(dirname "$0")" && pwd)
bash "$HERE/../../shared/reference/setup-llama.sh"
S=$(echo "$ROOT"/llama_cpp_python-*/vendor/llama.cpp)
cmake -S "$S" -B "$ROOT/build" -DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON \
  -DGGML_F16C=ON -DGGML_BMI2=ON -DGGML_AVX512=ON -DGGML_AVX512_VBMI=ON -DGGML_AVX512_VNNI=ON \
  -DGGML_AVX512_BF16=ON -DGGML_AVX_VNNI=ON >/dev/null
cmake --build "$ROOT/build" -j2 --target llama-bench llama-cli llama-completion llama-quantize llama-server llama-tokenize
echo "reference (no AMX) ready: source $HERE/../../shared/reference/env.sh"
