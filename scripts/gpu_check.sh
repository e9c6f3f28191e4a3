#!/usr/bin/env bash
# The GPU checks, in one short run on a CUDA machine: the CUDA tests; where a decode step's time goes
# (benchmarks/cuda_step.py: each kernel and each formulation of the products); the benchmark on a random 7B model in
# bf16 (ours with and without CUDA graphs and queued steps, and transformers; then ours with int8 and int4, then
# --compile); the CPU kernel tests on that machine's CPU in the time left. The most wanted come first; each step's
# timeout leaves the ones after it their share. Results go to $OUT (default /tmp/gpu-check): eight files, as many
# as the device tool brings back. Needs torch with CUDA, transformers, pytest and this package's dependencies;
# wheels in .whl/ are installed first when the machine cannot reach a registry (see BENCHMARKS.md for the ones a
# bare CUDA machine lacks).
#
#   bash scripts/gpu_check.sh [seconds allowed, default 540]
set -u
budget=${1:-540}
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

# what everything below needs, checked in seconds: a machine that lacks a package costs a rerun, not the whole budget
python3 - <<'PY' 2>&1 | tee -a "$OUT/machine.txt"
import sys

import torch
import transformers  # noqa: F401

import mistral_cli.cli.app  # noqa: F401
import mistral_cli.engine.load  # noqa: F401

sys.path.insert(0, "tests")
import tiny

assert tiny.tokenizer_path().is_file(), "no v1 tokenizer in mistral-common"
assert torch.cuda.is_available(), "torch sees no CUDA GPU"
print("ready:", torch.cuda.get_device_name(), "torch", torch.__version__)
PY
[ "${PIPESTATUS[0]}" = 0 ] || { echo "the machine lacks what the checks need (above)"; exit 3; }

echo "== CUDA tests ($(left) s left)"
timeout 180 python3 -m pytest -p no:cacheprovider -rs tests/test_cuda.py 2>&1 | tee "$OUT/tests.log" | tail -40
echo "tests exit status ${PIPESTATUS[0]}"

echo "== where a decode step's time goes ($(left) s left)"
timeout 100 python3 benchmarks/cuda_step.py 2>&1 | grep -v USDT | tee "$OUT/probe.md" | grep -E "^\| (eager|CUDA|int)|tokens:|One step"

# one random 7B checkpoint for every benchmark below; the most wanted figures first
bench() { # name, seconds to leave for what follows, then the benchmark's own arguments
    local name=$1 after=$2
    shift 2
    echo "== 7B benchmark: $name ($(left) s left)"
    timeout "$(until_end "$after")" python3 benchmarks/bench.py --device cuda --shape 7b --model-dir /tmp/gpu-check-7b \
        --dtype bf16 --prompt 512 --decode 128 --repeats 2 --accuracy-tokens 64 --timeout 150 "$@" 2>&1 |
        tee "$OUT/bench-$name.md"
}
bench bf16 240 --quantize none --engines ours transformers ours+sync ours+graphs --json "$OUT/bench-bf16.json"
bench quantized 160 --quantize int8 int4 --engines ours
bench compile 80 --quantize none --engines ours+compile

echo "== CPU kernel tests on this machine's CPU ($(left) s left)"
timeout "$(until_end 5)" python3 -m pytest -p no:cacheprovider tests/test_kernels.py 2>&1 | tee "$OUT/kernels.log" | tail -15
echo "kernel tests exit status ${PIPESTATUS[0]}"
