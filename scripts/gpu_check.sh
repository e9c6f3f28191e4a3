#!/usr/bin/env bash
# The GPU checks, in one short run on a CUDA machine: the CUDA tests, the benchmark on a random 7B model in bf16
# (ours with and without CUDA graphs and queued steps, transformers, --compile), then the CPU kernel tests on that
# machine's CPU. Results go to $OUT (default /tmp/gpu-check). Needs torch with CUDA, transformers, pytest and
# this package's dependencies; wheels in .whl/ are installed first when the machine cannot reach a registry.
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

echo "== 7B bf16 benchmark ($(left) s left)"
timeout "$(until_end 70)" python3 -m mistral_cli.bench --device cuda --shape 7b --dtype bf16 --quantize none \
    --engines ours transformers ours+sync ours+eager ours+compile --prompt 512 --decode 256 --repeats 2 \
    --accuracy-tokens 64 --timeout 150 --json "$OUT/bench-7b.json" 2>&1 | tee "$OUT/bench-7b.md"

echo "== CPU kernel tests on this machine's CPU ($(left) s left)"
timeout "$(until_end 5)" python3 -m pytest -p no:cacheprovider -x tests/test_kernels.py 2>&1 | tee "$OUT/kernels.log" | tail -15
echo "kernel tests exit status ${PIPESTATUS[0]}"
