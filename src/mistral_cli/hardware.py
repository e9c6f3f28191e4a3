"""What the machine offers, read without torch so `mistral info` can answer instantly: CPU flags, free memory,
and the dtype that `auto` resolves to."""

from __future__ import annotations

import os
import platform
import shlex
import shutil
import sys
from functools import cache
from pathlib import Path

KERNELS_ENV = "MISTRAL_KERNELS"  # "off": torch's CPU kernels instead of ours; "avx2": ours without AVX-512
GRAPHS_ENV = "MISTRAL_CUDA_GRAPHS"  # "on": decode steps replayed from CUDA graphs (off by default: engine/cuda.py)
QUICK_ENV = "MISTRAL_QUICK"  # "off": `mistral complete` always loads torch (engine/quick.py)
ADAPT_ENV = "MISTRAL_ADAPT_THREADS"  # "off": decode steps keep the thread count they were loaded with


SWITCH_VALUES = ("", "0", "1", "on", "off", "yes", "no", "true", "false")


def bad_switch() -> str | None:
    """A sentence for a switch variable set to something that is not on or off, which would be ignored silently."""
    for env in (KERNELS_ENV, GRAPHS_ENV, QUICK_ENV, ADAPT_ENV):
        raw = os.environ.get(env)
        allowed = (*SWITCH_VALUES, "avx2") if env == KERNELS_ENV else SWITCH_VALUES
        if raw is not None and raw.strip().lower() not in allowed:
            more = ", or avx2 for the AVX2 kernels on a CPU with AVX-512" if env == KERNELS_ENV else ""
            return f"{env} must be on or off (or 1, 0){more}, not {raw!r}."
    return None


def switched_off(env: str) -> bool:
    """Whether the variable `env` switches a feature off: 0, off, no or false."""
    return os.environ.get(env, "").strip().lower() in ("0", "off", "no", "false")


def switched_on(env: str) -> bool:
    """Whether the variable `env` switches a feature on: 1, on, yes or true."""
    return os.environ.get(env, "").strip().lower() in ("1", "on", "yes", "true")


@cache
def cpu_flags() -> frozenset[str]:
    """The CPU feature flags from /proc/cpuinfo (empty where there is none: macOS, Windows)."""
    if platform.system() == "Linux":
        try:
            with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
                for line in f:
                    if line.startswith(("flags", "Features")):  # x86 and arm64 spellings
                        return frozenset(line.split(":", 1)[1].split())
        except OSError:
            pass
    return frozenset()


def gpu_present() -> bool:
    """Whether `--device auto` might pick a GPU, told without torch: an NVIDIA or AMD GPU's device files, or a Mac
    (Metal). A CPU-only build of torch on such a machine still uses the CPU; this errs towards asking torch."""
    if platform.system() == "Darwin":
        return True
    return any(os.path.exists(p) for p in ("/dev/nvidiactl", "/dev/nvidia0", "/dev/kfd", "/dev/dxg"))


def torch_vector_halves() -> int | None:
    """torch's float vectors in its CPU kernels, in halves of 8 lanes, as torch decides them (its CPU capability:
    AVX-512 code where the CPU has AVX512-F/BW/VL/DQ and FMA), told without torch: kernels.c adds RMSNorm's squares
    in the order torch's sum does. None when ATEN_CPU_CAPABILITY chooses otherwise: then only torch can tell."""
    if os.environ.get("ATEN_CPU_CAPABILITY"):
        return None
    return 2 if {"avx512f", "avx512bw", "avx512vl", "avx512dq", "fma"} <= cpu_flags() else 1


def default_threads() -> int:
    """torch's default thread count, told without torch: OMP_NUM_THREADS where set, else one per physical core."""
    raw = os.environ.get("OMP_NUM_THREADS", "").split(",")[0].strip()
    if raw.isdigit() and int(raw) > 0:
        return int(raw)
    cores = set()
    for cpu in range(os.cpu_count() or 1):
        topology = Path(f"/sys/devices/system/cpu/cpu{cpu}/topology")
        try:
            cores.add((topology / "core_id").read_text().strip() + "/" + (topology / "physical_package_id").read_text())
        except OSError:
            return os.cpu_count() or 1
    return max(len(cores), 1)


def _arm64() -> bool:
    return platform.machine().lower() in ("arm64", "aarch64")


@cache
def cpu_has_fast_bf16() -> bool:
    """bf16 matrix *products* are fast on a CPU only with AVX512-BF16 or AMX (docs/FORMAT.md section 7), or on Apple
    silicon; elsewhere torch runs a bf16 GEMM several times slower than a float32 one."""
    if cpu_flags() & {"avx512_bf16", "amx_bf16"}:
        return True
    return platform.system() == "Darwin" and _arm64()


@cache
def cpu_bf16_decode_ok() -> bool:
    """Whether bf16 weights decode at least as fast as float32 ones: true wherever torch converts bf16 with SIMD
    (AVX2 or AVX-512 on x86, NEON on arm64). A decode step is a matrix-vector product bound by memory bandwidth,
    and bf16 weights are half the bytes: on a 2-core AVX2 machine a bf16 decode step is about 2x faster than a
    float32 one even though a bf16 GEMM is slower (BENCHMARKS.md). Prompts still run in float32 blocks there (model/transformer.py)."""
    if cpu_has_fast_bf16() or _arm64():
        return True
    return bool(cpu_flags() & {"avx2", "avx512f"})


def available_memory() -> int | None:
    try:
        with open("/proc/meminfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def auto_dtype(device_type: str, n_params: int, cuda_bf16: bool = True) -> str:
    """The dtype name `auto` means: bf16 on cuda (fp16 on old GPUs), fp16 on mps; on a CPU bf16 wherever it
    decodes fast (AVX2/AVX-512/NEON: nearly every CPU of the last ten years), else fp32 if it fits in memory."""
    if device_type == "cuda":
        return "bf16" if cuda_bf16 else "fp16"
    if device_type == "mps":
        return "fp16"
    if cpu_bf16_decode_ok():
        return "bf16"
    # an old CPU with no SIMD bf16 conversion: fp32 is faster, unless the doubled weights would not fit
    free = available_memory()
    return "bf16" if free is not None and n_params * 4 > 0.85 * free else "fp32"


def dtype_name(requested: str, device_type: str, n_params: int, cuda_bf16: bool = True) -> str:
    """The compute dtype's name for --dtype `requested` ("auto", "bf16", "fp16", "fp32") on a device type: the one
    decision that `mistral info` reports and the loader maps to a torch dtype (model/placement.py)."""
    return requested if requested != "auto" else auto_dtype(device_type, n_params, cuda_bf16)


def c_compiler() -> list[str] | None:
    """The C compiler command that builds our kernels: $CC (which may carry options), else the first of cc, gcc
    and clang on the PATH; None when there is none."""
    if os.environ.get("CC", "").strip():
        cmd = shlex.split(os.environ["CC"])
        return cmd if shutil.which(cmd[0]) else None
    return next(([c] for c in ("cc", "gcc", "clang") if shutil.which(c)), None)


def kernels_not_wanted() -> str | None:
    """Why our CPU kernels (kernels.c) are not for this run whatever the user installs: switched off, or a CPU they
    do not run on. None when they are."""
    if switched_off(KERNELS_ENV):
        return f"switched off with ${KERNELS_ENV}"
    if platform.machine().lower() not in ("x86_64", "amd64") or not {"avx2", "fma"} <= cpu_flags():
        return "they need an x86-64 CPU with AVX2 and FMA"
    return None


def kernels_blocker() -> str | None:
    """Why our CPU kernels cannot be used here, or None when they can once the compiler builds them."""
    if reason := kernels_not_wanted():
        return reason
    if c_compiler() is None:
        return "no C compiler to build them ($CC, cc, gcc or clang)"
    return None


# How a run shares the CPU with other programs, decided before torch starts its OpenMP threads (below).
SHARED_CPU: str | None = None
OTHERS_RUNNING = 0  # the programs that share_the_cpu saw running
_SHARED_THREADS: int | None = None
_LOOKED = False  # whether share_the_cpu has looked at the machine


def share_the_cpu() -> str | None:
    """When other programs are running on the CPUs as the model loads, have idle OpenMP threads sleep at once
    (OMP_WAIT_POLICY=PASSIVE) instead of spinning, and leave them their cores (`shared_threads`). A decode step waits
    at a barrier for its slowest thread many times: a spinning thread takes the core the other program, or our own
    descheduled thread, needs, and a thread that shares its core with a busy program slows every step to its pace.
    On an idle machine spinning is a few percent faster on small models (BENCHMARKS.md, "Sharing the machine"), so it
    stays the default there. Only before torch is imported (libgomp reads the variable when it starts), and never
    over the user's own OMP_WAIT_POLICY or GOMP_SPINCOUNT. Returns the note for --verbose, or None."""
    global SHARED_CPU, OTHERS_RUNNING, _LOOKED
    if _LOOKED:  # once a run: `complete` looks before its quick path, and again if it loads torch after all
        return SHARED_CPU
    _LOOKED = True
    if sys.modules.get("torch") is not None or "OMP_WAIT_POLICY" in os.environ or "GOMP_SPINCOUNT" in os.environ:
        return None
    others = _others_running()
    if others < 1:
        return None
    os.environ["OMP_WAIT_POLICY"] = "PASSIVE"
    OTHERS_RUNNING = others
    SHARED_CPU = f"shared CPU: {others} other program{'s' * (others != 1)} running"
    return SHARED_CPU


def shared_threads(default: int) -> int:
    """Decode threads when share_the_cpu saw other programs running: torch's default (one per core) less one per busy
    program, at least one; `default` otherwise, or when the user chose a count with OMP_NUM_THREADS (--threads is
    applied after this). On 2 cores with one busy process, one thread decodes as fast as two sleeping ones on the 7B
    shape and 1.1-1.2x faster on the small one (BENCHMARKS.md). Decided once: a model loaded later (chat's /model)
    keeps the count."""
    global _SHARED_THREADS
    if _SHARED_THREADS is None:
        fewer = OTHERS_RUNNING and "OMP_NUM_THREADS" not in os.environ
        _SHARED_THREADS = max(1, default - OTHERS_RUNNING) if fewer else default
    return _SHARED_THREADS


def adaptive_threads(chosen: int | None) -> int | None:
    """The most threads a decode step may adapt up to as other programs start and stop (engine/pacing.py): one per
    core; None where the count is the user's own (--threads, MISTRAL_THREADS, OMP_NUM_THREADS) or MISTRAL_ADAPT_THREADS
    is off."""
    if chosen is not None or "OMP_NUM_THREADS" in os.environ or switched_off(ADAPT_ENV):
        return None
    return default_threads()


def _others_running(samples: int = 5) -> int:
    """Programs running on the CPUs besides this one, from the kernel's count of runnable threads (the median of a few
    samples 10 ms apart: one sample catches short-lived tasks); 0 where /proc/stat does not say."""
    import time

    counts = []
    for i in range(samples):
        try:
            with open("/proc/stat", encoding="ascii", errors="replace") as f:
                line = next((x for x in f if x.startswith("procs_running")), "")
        except OSError:
            return 0
        if not line:
            return 0
        counts.append(int(line.split()[1]) - 1)  # this process is one of them
        if i + 1 < samples:
            time.sleep(0.01)
    return max(sorted(counts)[len(counts) // 2], 0)
