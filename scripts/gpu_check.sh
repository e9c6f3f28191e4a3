#!/usr/bin/env bash
# The GPU checks, in one short run on a CUDA machine: the CUDA tests, the benchmark on a random 7B model in bf16
# (ours with and without CUDA graphs and queued steps, and transformers; then ours with int8 and int4; then
# --compile), then the CPU kernel tests on that machine's CPU. Results go to $OUT (default /tmp/gpu-check): seven
# files, as the device tool brings back at most eight. Needs torch with CUDA, transformers, pytest and this
# package's dependencies; wheels in .whl/ are installed first when the machine cannot reach a registry (see
# BENCHMARKS.md for the ones a bare CUDA machine lacks).
#
#   bash scripts/gpu_check.sh [seconds allowed, default 560]
set -u
budget=${1:-560}
OUT=${OUT:-/tmp/gpu-check}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
if compgen -G ".whl/*.whl" >/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl &&
        export PYTHONPATH="$PYTHONPATH:/tmp/site"
fi
left() { echo $((budget - SECONDS)); }
until_end() { local n=$((budget - SECONDS - $1)); echo $((n > 20 ? n : 20)); } # seconds left but $1, at least 20

{
    nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm,clocks.max.mem --format=csv
    python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"
    lscpu | grep -E "^Model name|^CPU\(s\)"
    grep -o -w -E "avx512f|avx512_bf16|avx512_vnni|avx_vnni|amx_bf16" /proc/cpuinfo | sort -u | tr '\n' ' '
    echo
} 2>&1 | tee "$OUT/machine.txt"

echo "== CUDA tests ($(left) s left)"
timeout 200 python3 -m pytest -p no:cacheprovider -rs tests/test_cuda.py 2>&1 | tee "$OUT/tests.log" | tail -40
echo "tests exit status ${PIPESTATUS[0]}"

# one random 7B checkpoint for every benchmark below; the most wanted figures first
bench() { # name, seconds to leave for what follows, then the benchmark's own arguments
    local name=$1 after=$2
    shift 2
    echo "== 7B benchmark: $name ($(left) s left)"
    timeout "$(until_end "$after")" python3 benchmarks/bench.py --device cuda --shape 7b --model-dir /tmp/gpu-check-7b \
        --dtype bf16 --prompt 512 --decode 256 --repeats 2 --accuracy-tokens 64 --timeout 150 "$@" 2>&1 |
        tee "$OUT/bench-$name.md"
}
bench bf16 150 --quantize none --engines ours transformers ours+sync ours+eager --json "$OUT/bench-bf16.json"
bench quantized 110 --quantize none int8 int4 --engines ours
bench compile 70 --quantize none --engines ours+compile

echo "== CPU kernel tests on this machine's CPU ($(left) s left)"
timeout "$(until_end 5)" python3 -m pytest -p no:cacheprovider -x tests/test_kernels.py 2>&1 | tee "$OUT/kernels.log" | tail -15
echo "kernel tests exit status ${PIPESTATUS[0]}"
