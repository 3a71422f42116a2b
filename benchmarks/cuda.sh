#!/usr/bin/env bash
# The checks for a machine with a CUDA GPU, in one go: the CUDA tests (parity with diffusers in
# fp32 and fp16, the quick benchmark on the GPU), then the full benchmark on the GPU in fp16 at
# 512 and 256 px. Logs and results go to OUT_DIR.
#     bash benchmarks/cuda.sh OUT_DIR
set -uo pipefail
out=${1:?usage: bash benchmarks/cuda.sh OUT_DIR}
out=$(mkdir -p "$out" && cd "$out" && pwd)  # absolute: the script moves to the repository's root
cd "$(dirname "$0")/.."
python -c 'import torch; print("torch", torch.__version__, torch.cuda.get_device_name())' 2>/dev/null \
    || { echo "cuda.sh: torch sees no CUDA GPU" >&2; exit 1; }
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
python -m pytest -q -s -rs tests/test_cuda.py tests/test_benchmarks.py::test_quick_benchmark_on_cuda \
    > "$out/cuda-tests.log" 2>&1
grep -E "^fp16|^quick cuda|passed|failed|Error" "$out/cuda-tests.log"
for size in 512 256; do
    python -m benchmarks.run --device cuda --dtype float16 --engines sdlite,sdlite-low-memory,diffusers \
        --size "$size" --out "$out" 2>&1 | tee -a "$out/cuda-bench.log" | tail -32
done
