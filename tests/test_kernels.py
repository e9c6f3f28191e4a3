"""Our CPU decode kernels (kernels.c): each product against a float64 reference within a stated bound, their
build and cache, the fallback to torch's kernels, and a whole model decoding with them."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from functools import partial

import pytest
import torch

from mistral_cli.engine.engine import ROW_BY_ROW
from mistral_cli.engine.load import load_engine, load_model
from mistral_cli.hardware import KERNELS_ENV
from mistral_cli.model.placement import Placement
from mistral_cli.native import kernels
from mistral_cli.native.decode import use_kernels
from mistral_cli.options import LoadOptions
from tiny import write_hf

BF16 = Placement(torch.device("cpu"), torch.bfloat16)
FP32 = Placement(torch.device("cpu"), torch.float32)
F32_EPS = 2.0**-23


@pytest.fixture(scope="module")
def ops() -> kernels.Kernels:
    k = kernels.native()
    if k is None:
        pytest.skip(f"our kernels: {kernels.status()}")
    return k


def _rand(*shape: int, seed: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def _act_error(x: torch.Tensor, w: torch.Tensor, block: int) -> torch.Tensor:
    """Bound on |(x - x') @ w.T| where x' is x quantized to int8 in blocks: half a step per element."""
    amax = x.double().abs().reshape(-1, x.shape[-1] // block, block).amax(-1, keepdim=True)
    half_step = (amax / 127 / 2).expand(-1, -1, block).reshape(x.shape)
    return half_step @ w.double().abs().T


def _as_quantized(x: torch.Tensor, block: int) -> torch.Tensor:
    """x as the kernels see it after quantizing it to int8 in blocks, in float64: q * max|x| / 127 per block, q
    rounded to nearest even from x * (127 / max|x|), both computed in float32 as kernels.c does."""
    xb = x.float().reshape(-1, x.shape[-1] // block, block)
    amax = xb.abs().amax(-1, keepdim=True)
    inv = torch.where(amax > 0, 127 / amax, torch.zeros_like(amax))
    v = xb * inv
    q = torch.round(v)
    return (q.double() * (amax / 127).double()).reshape(x.shape)


def _sum_error(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """Bound on float32 accumulation error over K terms, and bf16 rounding of the output."""
    K = x.shape[-1]
    return (x.double().abs() @ w.double().abs().T) * K * F32_EPS


def _check(y: torch.Tensor, ref: torch.Tensor, bound: torch.Tensor) -> None:
    if y.dtype == torch.bfloat16:  # the output rounded to bf16: half a bf16 step of the value
        bound = bound + ref.abs() * 2.0**-8
    err = (y.double() - ref).abs()
    assert (err <= bound + 1e-9).all(), f"worst excess {float((err - bound).max())}"


SHAPES = [(1, 32), (3, 64), (4, 96), (5, 4096), (130, 512)]  # remainders of the 4-row blocks, wide K


@pytest.mark.parametrize("N, K", SHAPES)
@pytest.mark.parametrize("xdtype", [torch.float32, torch.bfloat16], ids=["x-fp32", "x-bf16"])
def test_bf16_product(ops, N, K, xdtype):
    w = _rand(N, K, seed=N).to(torch.bfloat16)
    x = _rand(1, K, seed=K).to(xdtype)
    y = ops.linear_bf16(x, w)
    assert y.shape == (1, N) and y.dtype == xdtype
    ref = x.double() @ w.double().T
    _check(y, ref, _sum_error(x, w))


@pytest.mark.parametrize("N, K", SHAPES)
@pytest.mark.parametrize("xdtype", [torch.float32, torch.bfloat16], ids=["x-fp32", "x-bf16"])
def test_int8_product(ops, N, K, xdtype):
    q = torch.randint(-127, 128, (N, K), generator=torch.Generator().manual_seed(N), dtype=torch.int8)
    scales = _rand(N, seed=1).abs() / 100
    x = _rand(1, K, seed=K).to(xdtype)
    x[0, 5] = 40.0  # an outlier: only its own block of 32 loses precision
    w = q.double() * scales.double()[:, None]
    y = ops.linear_int8(x, q, scales)
    assert y.shape == (1, N) and y.dtype == xdtype
    _check(y, x.double() @ w.T, _act_error(x, w, 32) + _sum_error(x, w))  # what quantizing x may cost at most
    _check(y, _as_quantized(x, 32) @ w.T, _sum_error(x, w))  # exactly that quantization, to float rounding


@pytest.mark.parametrize(
    "N, K", [(4, 512), (8, 1024), (132, 256), (12, 128), (8, 64), (4, 192), (4, 14336)],
    ids=["S256", "S256-wide", "S256-many", "S128", "S64", "S64-three", "7b-w2"],
)  # fmt: skip
def test_int4_product(ops, N, K):
    """Superblocks of 256, 128 or 64 columns (the largest that divides K): x is quantized in blocks of that size."""
    codes = torch.randint(0, 16, (N, K), generator=torch.Generator().manual_seed(N), dtype=torch.uint8)
    scales, lows = _rand(N, K // 64, seed=2).abs() / 50, _rand(N, K // 64, seed=3) / 5
    scales[0, 0] = 0.0  # a constant group
    scales[1, -1] /= 1000  # a group with a tiny range beside a wide one: its subscale is small
    x = _rand(1, K, seed=K)
    x[0, 70 % K] = -30.0
    packed, records = kernels.pack_int4(codes), kernels.pack_int4_scales(scales, lows)
    assert torch.equal(kernels.unpack_int4(packed), codes)
    s, lo = (t.double().repeat_interleave(64, dim=1) for t in kernels.unpack_int4_scales(records))
    # the scales as stored: within 1/32766 of their superblock's largest one; lows rounded to bf16
    S = kernels.int4_superblock(K)
    largest = scales.reshape(N, K // S, -1).amax(-1).double().repeat_interleave(S, dim=1)
    assert ((s - scales.double().repeat_interleave(64, dim=1)).abs() <= largest / 32766 * 1.0001).all()
    assert torch.equal(lo, lows.to(torch.bfloat16).double().repeat_interleave(64, dim=1))
    w = codes.double() * s + lo
    y = ops.linear_int4(x, packed, records)
    _check(y, x.double() @ w.T, _act_error(x, codes.double() * s, S) + _sum_error(x, w))
    # exactly: the codes times x quantized in blocks of S, and the lows times the sums of x itself
    exact = _as_quantized(x, S) @ (codes.double() * s).T + x.double() @ lo.T
    _check(y, exact, _sum_error(x, w))
    rows = slice(1, N - 1)  # rows that start and end inside blocks of four
    deq = ops.dequantize_int4(packed, records, rows)
    torch.testing.assert_close(deq.double(), w[rows], rtol=1e-6, atol=1e-6)
    # straight to bf16 (a prompt's GEMM in bf16): the float32 values rounded as torch rounds them
    assert torch.equal(ops.dequantize_int4(packed, records, rows, torch.bfloat16), deq.to(torch.bfloat16))


def test_int4_layout_mistakes_are_refused(ops):
    """The C code trusts its arguments: wrong shapes of codes or scales stop in Python."""
    codes = torch.randint(0, 16, (8, 256), dtype=torch.uint8)
    packed, records = kernels.pack_int4(codes), kernels.pack_int4_scales(torch.ones(8, 4), torch.zeros(8, 4))
    x = _rand(1, 256, seed=0)
    for bad_packed, bad_records in ((packed[:4], records), (packed, records[:, :, :-16]), (packed, records[:1])):
        with pytest.raises(ValueError, match="int4"):
            ops.linear_int4(x, bad_packed, bad_records)
    with pytest.raises(ValueError, match="rows"):
        ops.dequantize_int4(packed, records, slice(0, 9))


@pytest.mark.parametrize(
    "H, KV, D, L, start",
    [(32, 8, 128, 300, 0), (4, 4, 64, 1, 0), (8, 4, 64, 7, 0), (16, 2, 32, 129, 0), (6, 2, 16, 40, 0),
     (32, 8, 128, 300, 172)],
    ids=["mistral", "one-key", "short", "groups-of-8", "groups-of-3", "window"],
)  # fmt: skip
def test_attention(ops, avx2_ops, H, KV, D, L, start):
    """A decode step's attention against float64, keys and values read from a cache-like buffer (a view of the
    first L positions of a larger one); `start` > 0 is a sliding window. This CPU's build and the AVX2 one (the same
    where the CPU has no AVX512-BF16)."""
    cap = 512
    k_buf, v_buf = (_rand(1, KV, cap, D, seed=s).to(torch.bfloat16) for s in (1, 2))
    k_buf[:, :, L:] = float("nan")  # past the last key: never read (0 * NaN would show)
    v_buf[:, :, L:] = float("nan")
    k, v = k_buf[:, :, :L], v_buf[:, :, :L]
    q = (_rand(1, KV, H // KV, D, seed=3) * 3).to(torch.bfloat16)  # large enough scores for a peaked softmax
    kd, vd = k[:, :, start:].double(), v[:, :, start:].double()
    weights = torch.softmax(q.double() @ kd.transpose(-1, -2) / D**0.5, dim=-1)
    ref = (weights @ vd).reshape(H, D)
    # the output rounded to bf16, plus the float32 sums and exp (relative 2e-7) in between
    bound = ref.abs() * 2.0**-8 + 1e-4
    # with AVX512-BF16 the weights are rounded to bf16 and divided by their own sum: each stays within 2^-8 of its
    # exact value, which moves the output by at most 2^-8 of the weighted sum of |v|
    rounded_weights = bound + 2.0**-8 * (weights @ vd.abs()).reshape(H, D)
    outs = []
    for build in (ops, avx2_ops):
        assert build.attention_fits(q, k, v)
        got = build.attention(q, k, v, start)
        assert got.shape == (H, D) and got.dtype == torch.bfloat16
        assert ((got.double() - ref).abs() <= (rounded_weights if build.features & 1 else bound)).all()
        outs.append(got)
    if not ops.features & 1:
        assert torch.equal(*outs)


def test_attention_takes_only_what_it_can(ops):
    k = torch.zeros(1, 2, 10, 64, dtype=torch.bfloat16)
    q = torch.zeros(1, 2, 2, 64, dtype=torch.bfloat16)
    assert ops.attention_fits(q, k, k)
    assert not ops.attention_fits(q.float(), k.float(), k.float())  # a float32 cache
    assert not ops.attention_fits(q, k.transpose(2, 3), k.transpose(2, 3))  # not the cache's layout
    assert not ops.attention_fits(torch.zeros(1, 2, 9, 64, dtype=torch.bfloat16), k, k)  # 9 query heads per kv head
    assert not ops.attention_fits(torch.zeros(2, 2, 2, 64, dtype=torch.bfloat16), k.expand(2, -1, -1, -1), k)


def test_shapes_the_c_code_cannot_check_are_refused(ops):
    w = torch.zeros(8, 64, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="one contiguous row of 64"):
        ops.linear_bf16(torch.zeros(1, 32, dtype=torch.bfloat16), w)  # would read past x
    with pytest.raises(ValueError, match="one contiguous row"):
        ops.linear_bf16(torch.zeros(2, 64, dtype=torch.bfloat16), w)  # two rows: the caller's job
    with pytest.raises(ValueError, match="one contiguous row"):
        ops.linear_int8(torch.zeros(1, 64), torch.zeros(64, 8, dtype=torch.int8).T, torch.ones(8))


def test_every_thread_count_gives_the_same_bits(ops):
    """Each output row is computed whole by one thread, so the thread count cannot change a result."""
    w = _rand(260, 1024, seed=0).to(torch.bfloat16)
    q = torch.randint(-127, 128, (260, 1024), dtype=torch.int8)
    codes = torch.randint(0, 16, (260, 1024), dtype=torch.uint8)
    records = kernels.pack_int4_scales(_rand(260, 16, seed=1).abs(), _rand(260, 16, seed=3))
    x = _rand(1, 1024, seed=2).to(torch.bfloat16)
    before = torch.get_num_threads()

    def run() -> list[torch.Tensor]:
        return [
            ops.linear_bf16(x, w),
            ops.linear_int8(x, q, torch.ones(260)),
            ops.linear_int4(x, kernels.pack_int4(codes), records),
        ]

    try:
        torch.set_num_threads(1)
        one = run()
        torch.set_num_threads(max(2, before))
        many = run()
    finally:
        torch.set_num_threads(before)
    assert all(torch.equal(a, b) for a, b in zip(one, many, strict=True))


@pytest.fixture(scope="module")
def avx2_ops(ops) -> kernels.Kernels:
    """The AVX2 build of the same source (MISTRAL_KERNELS=avx2), beside this CPU's own."""
    import ctypes

    before = os.environ.get(KERNELS_ENV)
    os.environ[KERNELS_ENV] = "avx2"
    try:
        path = kernels._build(kernels.c_compiler())
    finally:
        if before is None:
            del os.environ[KERNELS_ENV]
        else:
            os.environ[KERNELS_ENV] = before
    built = kernels.Kernels(ctypes.CDLL(str(path)), path)
    assert built.features == 0 and kernels.label(built) == "AVX2 kernels"
    return built


def _needs(ops, bit: int, flags: str) -> None:
    if not ops.features & bit:
        pytest.skip(f"this CPU has no {flags}: the path is not built here (it runs on CPUs with {flags})")


@pytest.mark.parametrize("N, K", [*SHAPES, (4096, 4096), (36, 14336)])
def test_the_avx512_bf16_product_is_within_the_bound_and_near_avx2(ops, avx2_ops, N, K):
    _needs(ops, 1, "AVX512-BF16")
    w = _rand(N, K, seed=N).to(torch.bfloat16)
    x = _rand(1, K, seed=K).to(torch.bfloat16)
    y, old = ops.linear_bf16(x, w), avx2_ops.linear_bf16(x, w)
    ref = x.double() @ w.double().T
    _check(y, ref, _sum_error(x, w))
    _check(old, ref, _sum_error(x, w))
    # two float32 sums in different orders, each rounded to bf16: at most a bf16 step or two apart
    assert ((y.double() - old.double()).abs() <= ref.abs() * 2.0**-7 + _sum_error(x, w) * 2).all()
    # a float32 row keeps the widening path of the AVX2 build: the same bits
    assert torch.equal(ops.linear_bf16(x.float(), w), avx2_ops.linear_bf16(x.float(), w))


@pytest.mark.parametrize("N, K", [(4, 512), (132, 256), (12, 128), (8, 64), (4, 192), (36, 14336), (4096, 4096)])
def test_the_avx512_vnni_int4_product_is_the_avx2_one(ops, avx2_ops, N, K):
    """The VNNI path sums the same integers in the same lanes and then does the same float operations: the same bits
    as the AVX2 build (which test_int4_product checks against float64), for superblocks of 256, 128 and 64."""
    _needs(ops, 2, "AVX512-VNNI")
    codes = torch.randint(0, 16, (N, K), generator=torch.Generator().manual_seed(N), dtype=torch.uint8)
    scales, lows = _rand(N, K // 64, seed=2).abs() / 50, _rand(N, K // 64, seed=3) / 5
    scales[0, -1] /= 1000
    packed, records = kernels.pack_int4(codes), kernels.pack_int4_scales(scales, lows)
    for xdtype in (torch.float32, torch.bfloat16):
        x = (_rand(1, K, seed=K) * 3).to(xdtype)
        x[0, 70 % K] = -30.0
        assert torch.equal(ops.linear_int4(x, packed, records), avx2_ops.linear_int4(x, packed, records))


@pytest.mark.parametrize("N, K", [(8, 256), (12, 128), (4, 64), (4, 192), (36, 4096)])
def test_int4_rows_at_once_equal_each_row_alone(ops, avx2_ops, N, K):
    """A prompt's int4 product with VNNI (several activation rows per pass over the weights): each row the decode
    product of that row, bit for bit, for tails of 1-3 rows and more rows than one sweep (128) holds."""
    _needs(ops, 2, "AVX512-VNNI")
    assert ops.int4_rows and not avx2_ops.int4_rows
    codes = torch.randint(0, 16, (N, K), generator=torch.Generator().manual_seed(N), dtype=torch.uint8)
    scales, lows = _rand(N, K // 64, seed=2).abs() / 50, _rand(N, K // 64, seed=3) / 5
    packed, records = kernels.pack_int4(codes), kernels.pack_int4_scales(scales, lows)
    _each_row_alone(ops.linear_int4_rows, ops.linear_int4, N, K, packed, records)


def _each_row_alone(rows_product, row_product, N: int, K: int, *weights: torch.Tensor) -> None:
    """rows_product of M rows at once equals row_product of each row alone, bit for bit, for float32 and bf16 rows,
    tails of 1-3 rows and more rows than one sweep (128) holds."""
    for M in (2, 3, 5, 8, 130):
        for xdtype in (torch.float32, torch.bfloat16):
            x = (_rand(M, K, seed=M) * 3).to(xdtype)
            x[M - 1, 70 % K] = -30.0
            y = rows_product(x[None], *weights)
            assert y.shape == (1, M, N) and y.dtype == xdtype
            assert torch.equal(y[0], torch.stack([row_product(row, *weights) for row in x]))


@pytest.mark.parametrize("N, K", [(8, 256), (10, 2048), (7, 96), (36, 4096)])
def test_int8_rows_at_once_equal_each_row_alone(ops, avx2_ops, N, K):
    """A prompt's int8 product with VNNI: each row the decode product of that row, bit for bit, for tails of 1-3
    activation rows, weight-row tails, short rows (which the decode product takes one row at a time) and more rows
    than one sweep (128) holds; and the decode product of the AVX2 build is the same too."""
    _needs(ops, 2, "AVX512-VNNI")
    assert ops.int8_rows and not avx2_ops.int8_rows
    q = torch.randint(-127, 128, (N, K), generator=torch.Generator().manual_seed(N), dtype=torch.int8)
    q[0, :32] = 127  # sums of four products at the integer extremes
    q[1 % N, :32] = -127
    scales = _rand(N, seed=5).abs() / 50
    _each_row_alone(ops.linear_int8_rows, ops.linear_int8, N, K, q, scales)
    x = (_rand(3, K, seed=3) * 3).to(torch.bfloat16)
    assert torch.equal(ops.linear_int8(x[:1], q, scales), avx2_ops.linear_int8(x[:1], q, scales))
    with pytest.raises(ValueError, match="int8"):
        ops.linear_int8_rows(x, q[:, :-32].contiguous(), scales)


@pytest.mark.parametrize("N, K", [(20, 2048), (9, 256), (6, 4096)])
def test_bf16_rows_at_once_equal_each_row_alone(ops, avx2_ops, N, K):
    """A short prompt's bf16 product (up to four activation rows per pass over the weights, with AVX512-BF16 where
    the build has it, and on the AVX2 paths): each row the decode product of that row on the same build, bit for bit,
    with row tails of 1-3, weight-row tails, and short rows (which take the one-row-at-a-time dot)."""
    w = (_rand(N, K, seed=N) / 8).to(torch.bfloat16)
    for build in (ops, avx2_ops):
        for M in (1, 2, 3, 4, 5, 7, 9):
            x = (_rand(M, K, seed=M) * 3).to(torch.bfloat16)
            x[M - 1, 70 % K] = -30.0
            y = build.linear_bf16_rows(x[None], w)
            assert y.shape == (1, M, N) and y.dtype == torch.bfloat16
            assert torch.equal(y[0], torch.stack([build.linear_bf16(row, w) for row in x])), (build.features, M)
        with pytest.raises(ValueError, match="bf16 rows"):
            build.linear_bf16_rows(x.float(), w)


def test_the_label_says_which_paths_run(ops):
    label = kernels.label(ops)
    assert label.startswith("AVX2") and label.endswith("kernels")
    assert ("AVX512-BF16" in label) == bool(ops.features & 1)
    assert ("AVX512-VNNI" in label) == bool(ops.features & 2)


# The C code trusts the shapes it is given. Built with AddressSanitizer, every product, dequantization, attention and
# a whole decode step of each kind run on shapes with remainders; a read or write outside a buffer aborts the run.
ASAN_SCRIPT = """
import torch
from mistral_cli.native import kernels
from mistral_cli.native.decode import use_kernels
from mistral_cli.options import LoadOptions
from mistral_cli.engine.engine import ROW_BY_ROW
from mistral_cli.engine.load import load_engine, load_model
from mistral_cli.model.placement import Placement
from tiny import TinySpec, random_state_dict, write_hf
ops = kernels.native()
assert ops is not None, kernels.status()
g = torch.Generator().manual_seed(0)
for N, K in [(5, 32), (7, 1024), (6, 2048), (130, 4096)]:
    x = torch.randn(1, K, generator=g)
    ops.linear_bf16(x, torch.randn(N, K, generator=g).to(torch.bfloat16))
    ops.linear_int8(x.to(torch.bfloat16), torch.randint(-127, 128, (N, K), dtype=torch.int8), torch.ones(N))
    ops.linear_bf16_rows(torch.randn(5, K).to(torch.bfloat16), torch.randn(N, K).to(torch.bfloat16))
    if ops.int8_rows:
        ops.linear_int8_rows(torch.randn(5, K), torch.randint(-127, 128, (N, K), dtype=torch.int8), torch.ones(N))
for N, K in [(4, 64), (8, 128), (4, 192), (12, 256), (8, 1024)]:  # superblocks of 64, 128, 64, 256, 256
    packed = kernels.pack_int4(torch.randint(0, 16, (N, K), dtype=torch.uint8))
    records = kernels.pack_int4_scales(torch.rand(N, K // 64), torch.randn(N, K // 64))
    ops.linear_int4(torch.randn(1, K), packed, records)
    ops.dequantize_int4(packed, records, slice(0, N))
    ops.dequantize_int4(packed, records, slice(1, N), torch.bfloat16)
    if ops.int4_rows:
        ops.linear_int4_rows(torch.randn(5, K), packed, records)
    ops.dequantize_int4(packed, records, slice(N - 1, N))
for L in (1, 37):
    for D in (64, 48):  # 32 columns at a time with AVX512-BF16, and a masked last 16
        q = torch.randn(1, 8, 1, D).to(torch.bfloat16)
        kv = torch.randn(1, 2, L, D).to(torch.bfloat16)
        ops.attention(q, kv, kv.clone())
spec = TinySpec()
folder = write_hf(__import__("pathlib").Path(%r), spec, random_state_dict(spec), dtype=torch.bfloat16)
for mode in ("none", "int8", "int4"):
    model = load_model(folder, Placement(torch.device("cpu"), torch.bfloat16), quantize=mode, kernels=ops)
    fused = use_kernels(model, ops)
    cache = model.new_cache(16)
    with torch.inference_mode():
        model(torch.tensor([[1, 2, 3]]), cache)
        for i in range(3):
            model(torch.tensor([[4 + i]]), cache)  # one call per layer
            fused(7 + i, cache, cache.length)  # the whole step in one call
print("clean")
"""


@pytest.mark.parametrize("build", ["native", "avx2"])
def test_no_kernel_reads_or_writes_outside_its_buffers(ops, tmp_path, build):
    if build == "avx2" and not ops.features:
        pytest.skip("this CPU's build is the AVX2 one")
    gcc = shutil.which("gcc")
    libasan = (
        gcc and subprocess.run([gcc, "-print-file-name=libasan.so"], capture_output=True, text=True).stdout.strip()
    )
    if not libasan or not os.path.isabs(libasan) or not os.path.exists(libasan):
        pytest.skip("gcc has no AddressSanitizer runtime here")
    env = {
        **{k: v for k, v in os.environ.items() if k != "MISTRAL_KERNELS"},
        "CC": "gcc -fsanitize=address -fno-omit-frame-pointer",
        "LD_PRELOAD": libasan,
        "ASAN_OPTIONS": "detect_leaks=0:verify_asan_link_order=0",
        "XDG_CACHE_HOME": str(tmp_path / "cache"),
        "PYTHONPATH": os.pathsep.join([os.path.dirname(__file__), os.environ.get("PYTHONPATH", "")]),
        **({"MISTRAL_KERNELS": "avx2"} if build == "avx2" else {}),
    }
    script = ASAN_SCRIPT % str(tmp_path / "model")
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0 and "clean" in proc.stdout, proc.stdout + proc.stderr[-3000:]


# ----------------------------------------------------------------------------------------------- build and fallback


def _kernels_cli(tmp_path, **env: str) -> subprocess.CompletedProcess[str]:
    inherited = {k: v for k, v in os.environ.items() if k != "MISTRAL_KERNELS"}
    e = {**inherited, "XDG_CACHE_HOME": str(tmp_path / "cache"), **env}
    return subprocess.run(
        [sys.executable, "-m", "mistral_cli.native.kernels"], capture_output=True, text=True, env=e, timeout=300
    )


def test_built_once_into_the_user_cache_and_reused(ops, tmp_path):
    first = _kernels_cli(tmp_path)
    assert first.returncode == 0 and "kernels: on" in first.stdout, first.stdout + first.stderr
    built = list((tmp_path / "cache" / "mistral-cli" / "kernels").glob("kernels-*.so"))
    assert len(built) == 1 and str(built[0]) in first.stdout
    stamp = built[0].stat().st_mtime_ns
    again = _kernels_cli(tmp_path)
    assert again.returncode == 0 and built[0].stat().st_mtime_ns == stamp  # loaded, not rebuilt
    assert list(built[0].parent.iterdir()) == built  # no temporary files left behind


def test_an_unusable_cache_folder_builds_into_a_private_temporary_one(ops, tmp_path):
    (tmp_path / "cache").write_text("a file where the cache folder should be")  # as good as read-only, even for root
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    proc = _kernels_cli(tmp_path, TMPDIR=str(tmp))
    assert proc.returncode == 0 and "kernels: on" in proc.stdout, proc.stdout + proc.stderr
    (private,) = tmp.glob("mistral-cli-kernels-*")
    assert str(private) in proc.stdout and private.stat().st_mode & 0o077 == 0
    # a folder others can write in is never used: a library is loaded from it
    for lib in private.iterdir():
        lib.unlink()
    private.chmod(0o777)
    proc = _kernels_cli(tmp_path, TMPDIR=str(tmp))
    assert proc.returncode == 1 and "no writable folder for the built kernels" in proc.stdout, proc.stdout
    assert list(private.iterdir()) == []


@pytest.mark.parametrize(
    "env, says",
    [
        ({"MISTRAL_KERNELS": "off"}, "switched off with $MISTRAL_KERNELS"),
        ({"CC": "/nonexistent/cc"}, "unavailable: no C compiler to build them"),
    ],
    ids=["switched-off", "no-compiler"],
)
def test_without_them_torch_kernels_are_used(ops, tmp_path, hf_model_dir, env, says):
    proc = _kernels_cli(tmp_path, **env)
    assert proc.returncode == 1 and says in proc.stdout, proc.stdout + proc.stderr
    # the CLI still works, on torch's kernels, and says so in --verbose
    args = ["complete", "-m", str(hf_model_dir), "-n", "5", "-t", "0", "--verbose", "--device", "cpu", "Roses are"]
    run_env = {**os.environ, "XDG_CACHE_HOME": str(tmp_path / "cache"), **env}
    out = subprocess.run([sys.executable, "-m", "mistral_cli", *args], capture_output=True, text=True, env=run_env)
    assert out.returncode == 0 and " kernels, " not in out.stderr and out.stdout, out.stderr
    assert "Traceback" not in out.stderr
    # a missing compiler is worth saying (the user can install one); a switch the user set is not
    assert ("torch kernels (no C compiler" in out.stderr) == ("CC" in env), out.stderr


def test_a_broken_compiler_is_one_sentence(ops, tmp_path):
    fake = tmp_path / "cc"
    fake.write_text("#!/bin/sh\necho 'cc: internal error' >&2\nexit 1\n")
    fake.chmod(0o755)
    proc = _kernels_cli(tmp_path, CC=str(fake))
    assert proc.returncode == 1 and "could not build the kernels: cc: internal error" in proc.stdout, proc.stdout
    # a compiler given with options in $CC
    proc = _kernels_cli(tmp_path, CC=f"{fake} -m64")
    assert proc.returncode == 1 and f"{fake} -m64 could not build the kernels" in proc.stdout, proc.stdout
    assert "Traceback" not in proc.stdout + proc.stderr


# ----------------------------------------------------------------------------------------------------- whole model


@pytest.fixture(scope="module")
def wide_model(tmp_path_factory, tiny_spec):
    """A tiny model whose layers are wide enough for every kernel path (dim 512: the vectorized int4 path)."""
    from tiny import random_state_dict

    spec = tiny_spec.but(dim=512, hidden_dim=1024, n_heads=8, n_kv_heads=2, head_dim=64)
    return write_hf(tmp_path_factory.mktemp("kern") / "wide", spec, random_state_dict(spec), dtype=torch.bfloat16)


def _decode(model, tokens, steps):
    """Prefill `tokens`, then feed `steps` of them again one at a time: the logits of every single-row step."""
    cache, out = model.new_cache(), []
    with torch.inference_mode():
        model(tokens, cache)
        for t in tokens[0, :steps]:
            out.append(model(t.view(1, 1), cache)[0, -1])
    return torch.stack(out)


@pytest.mark.parametrize("mode", ["none", "int8", "int4"])
def test_model_decodes_the_same_with_our_kernels(ops, wide_model, mode):
    """Every product and the attention of a decode step on our kernels, against torch's."""
    tokens = torch.randint(3, 32000, (1, 24), generator=torch.Generator().manual_seed(7))
    theirs = load_model(wide_model, BF16, quantize=mode)
    mine = load_model(wide_model, BF16, quantize=mode, kernels=ops)
    use_kernels(mine, ops)
    kinds = {getattr(m, "kernel", None) for m in mine.modules()} - {None}
    assert kinds == (set() if mode == "none" else {"ours"})
    assert (mode != "none") or all(m.kernels is ops for m in mine.modules() if hasattr(m, "kernels"))
    ref = _decode(load_model(wide_model, FP32), tokens, 12)
    a, b = _decode(theirs, tokens, 12), _decode(mine, tokens, 12)
    # ours is as close to the float32 model as torch's kernels are (activations quantized to int8 cost a little)
    slack = {"none": 1.1, "int8": 1.5, "int4": 1.3}[mode]
    assert (b - ref).norm() <= slack * (a - ref).norm() + 1e-3 * ref.norm()
    assert (a.argmax(-1) == b.argmax(-1)).float().mean() >= 0.75


def test_sliding_window_decodes_the_same_with_our_kernels(ops, tmp_path, tiny_spec):
    """A model with a sliding window of 8, decoding past it: our attention sees only the last 8 keys too."""
    from tiny import random_state_dict

    spec = tiny_spec.but(dim=128, hidden_dim=256, head_dim=32, sliding_window=8)
    folder = write_hf(tmp_path / "w", spec, random_state_dict(spec), dtype=torch.bfloat16)
    tokens = torch.randint(3, 32000, (1, 20), generator=torch.Generator().manual_seed(9))
    theirs, mine = load_model(folder, BF16), load_model(folder, BF16, kernels=ops)
    assert use_kernels(mine, ops) is not None
    assert all(a.kernels is ops for a in (layer.attention for layer in mine.layers))
    a, b = _decode(theirs, tokens, 16), _decode(mine, tokens, 16)  # positions 20..35: the window slides
    ref = _decode(load_model(folder, FP32), tokens, 16)
    assert (b - ref).norm() <= 1.1 * (a - ref).norm() + 1e-3 * ref.norm()


# ------------------------------------------------------------------------------------------- the whole-step call


def _decode_both(model, fused, tokens, steps):
    """Logits and cache of `_decode` with the whole step in one call (`fused`), and with one call per layer."""
    results = []
    for one_call in (True, False):
        cache, out = model.new_cache(), []
        with torch.inference_mode():
            model(tokens, cache)
            for t in tokens[0, :steps]:
                out.append(fused(int(t), cache, cache.length) if one_call else model(t.view(1, 1), cache)[0, -1])
        results.append((torch.stack(out), cache))
    return results


@pytest.mark.parametrize("mode", ["none", "int8", "int4"])
def test_one_call_per_step_is_the_blocks_math(ops, wide_model, mode):
    """mc_decode_token (embedding, norms, RoPE, cache writes, attention, SiLU, residuals, final norm and head in
    C) against the model's modules on the same kernels: every rounding is the same (RMSNorm even adds its squares
    in torch's order), so the logits and the keys/values in the cache are bit-identical."""
    model = load_model(wide_model, BF16, quantize=mode, kernels=ops)
    step = use_kernels(model, ops)
    assert step is not None and len(step.step.layers) == len(model.layers)
    tokens = torch.randint(3, 32000, (1, 24), generator=torch.Generator().manual_seed(11))
    (fused, fcache), (blocks, bcache) = _decode_both(model, step, tokens, 16)
    n = fcache.length
    caches = zip(fcache.k + fcache.v, bcache.k + bcache.v, strict=True)
    pairs = [(fused, blocks)] + [(a[:, :, :n], b[:, :, :n]) for a, b in caches]
    if torch.backends.cpu.get_cpu_capability() in ("AVX2", "DEFAULT"):  # torch's 8-lane sums: the order we follow
        assert all(torch.equal(a, b) for a, b in pairs)
    else:  # AVX-512 builds sum in 16 lanes; the C code follows that order too, but it is not checked here
        assert all((a.float() - b.float()).norm() <= 2e-3 * b.float().norm() for a, b in pairs)


def test_one_call_per_step_after_rewinding(ops, wide_model):
    """A chat rewinds the cache and writes over old positions: the step writes where it is told and attends to
    nothing past it."""
    model = load_model(wide_model, BF16, kernels=ops)
    fused = use_kernels(model, ops)
    tokens = torch.randint(3, 32000, (1, 12), generator=torch.Generator().manual_seed(12))
    with torch.inference_mode():
        cache = model.new_cache()
        model(tokens, cache)
        model(tokens[:, :3], cache)  # 3 positions that are then dropped
        cache.truncate(12)
        again = fused(int(tokens[0, 5]), cache, 12)
        fresh = model.new_cache()
        model(tokens, fresh)
        once = fused(int(tokens[0, 5]), fresh, 12)
    assert torch.equal(again, once)


def _block_by_block_and_token_by_token(model, fused, tokens, pos):
    """The cache and last logits after feeding tokens[pos:] (tokens[:pos] already there) both ways."""
    results = []
    for together in (True, False):
        cache = model.new_cache()
        with torch.inference_mode():
            if pos:
                fused.feed(tokens[:pos], cache, 0)
            if together:
                logits = fused.feed(tokens[pos:], cache, pos)
            else:
                for i, t in enumerate(tokens[pos:]):
                    logits = fused(t, cache, pos + i)
        assert cache.length == len(tokens)
        results.append((logits, [c[:, :, : len(tokens)] for c in cache.k + cache.v]))
    return results


@pytest.mark.parametrize("mode", ["none", "int8", "int4"])
@pytest.mark.parametrize("pos", [0, 5])
@pytest.mark.parametrize("build", ["ops", "avx2_ops"])
def test_a_prompt_block_by_block_is_token_by_token(request, wide_model, mode, pos, build):
    """mc_decode_tokens (every token through block l, then block l + 1) against a call per token: the logits and
    every key and value bit-identical, from the start of the cache and after it, on this CPU's build and the AVX2
    one."""
    ops = request.getfixturevalue(build)
    model = load_model(wide_model, BF16, quantize=mode, kernels=ops)
    fused = use_kernels(model, ops)
    tokens = torch.randint(3, 32000, (13,), generator=torch.Generator().manual_seed(14)).tolist()
    (a, acache), (b, bcache) = _block_by_block_and_token_by_token(model, fused, tokens, pos)
    assert torch.equal(a, b)
    assert all(torch.equal(x, y) for x, y in zip(acache, bcache, strict=True))
    with pytest.raises(IndexError, match="not in the vocabulary"):
        fused.feed([5, model.cfg.vocab_size], model.new_cache(), 0)


def test_a_prompt_block_by_block_slides_its_window(ops, tmp_path, tiny_spec):
    """A prompt longer than the sliding window, fed block by block: each token attends to its own window."""
    from tiny import random_state_dict

    spec = tiny_spec.but(dim=128, hidden_dim=256, head_dim=32, sliding_window=4)
    folder = write_hf(tmp_path / "w", spec, random_state_dict(spec), dtype=torch.bfloat16)
    model = load_model(folder, BF16, kernels=ops)
    fused = use_kernels(model, ops)
    tokens = torch.randint(3, 32000, (11,), generator=torch.Generator().manual_seed(15)).tolist()
    (a, acache), (b, bcache) = _block_by_block_and_token_by_token(model, fused, tokens, 2)
    assert torch.equal(a, b)
    assert all(torch.equal(x, y) for x, y in zip(acache, bcache, strict=True))
    with torch.inference_mode():  # and the window matters: the model's own forward over the prompt agrees
        ref = model(torch.tensor([tokens]), model.new_cache(), last_only=True)[0, -1].float()
    assert (a - ref).norm() <= 0.05 * ref.norm()


@pytest.mark.parametrize("mode", ["none", "int8", "int4"])
def test_a_short_prompt_is_fed_as_decode_steps(ops, wide_model, mode):
    """A prompt of up to ROW_BY_ROW[mode] new tokens goes through the whole-step call one token at a time (a batch
    would dequantize every weight for two rows): its logits are the steps' bit for bit, and within bf16 rounding of
    the batched forward; one token more is a batch again."""
    engine = load_engine(wide_model, LoadOptions(dtype="bf16", quantize=mode, prepare=False))
    assert engine._fused is not None
    n = ROW_BY_ROW[engine._row_by_row]  # "int4-vnni", "int8-vnni" where prompts run as integers
    prompt = [1] + torch.randint(3, 32000, (n,), generator=torch.Generator().manual_seed(13)).tolist()
    with torch.inference_mode():
        cache = engine.model.new_cache()
        steps = [engine._fused(t, cache, i) for i, t in enumerate(prompt)]
        batched = [engine.model(torch.tensor([prompt[: m + 1]]), engine.model.new_cache(), last_only=True)[0, -1]
                   for m in (n - 1, n)]  # fmt: skip
    for m in (n - 1, n):
        engine.reset()
        logits, fed = engine.prefill(prompt[: m + 1])
        assert fed == m + 1
        batch = batched[m - n + 1]
        assert (logits.float() - batch.float()).norm() <= 0.05 * batch.float().norm()
        if m < n:
            assert torch.equal(logits, steps[m])
        else:
            assert torch.equal(logits, batch)


def test_a_short_bf16_prompt_takes_the_rows_product_on_the_avx2_build_too(avx2_ops, wide_model, monkeypatch):
    """Without AVX512-BF16 a short bf16 prompt's products still read each weight once for all its rows (the AVX2
    several-rows product): every linear layer of the forward goes through it, and the logits are torch's forward's
    within bf16 rounding."""
    model = load_model(wide_model, BF16, kernels=avx2_ops)
    use_kernels(model, avx2_ops)
    calls = []
    rows = avx2_ops.linear_bf16_rows
    monkeypatch.setattr(avx2_ops, "linear_bf16_rows", lambda x, w: calls.append(x.shape) or rows(x, w))
    prompt = torch.tensor([[1, *torch.randint(3, 32000, (6,), generator=torch.Generator().manual_seed(5)).tolist()]])
    with torch.inference_mode():
        got = model(prompt, model.new_cache(), last_only=True)[0, -1].float()
        ref = load_model(wide_model, BF16)(prompt, model.new_cache(), last_only=True)[0, -1].float()
    assert len(calls) == 4 * model.cfg.n_layers and all(shape[-2] == 7 for shape in calls)  # the head: one row
    assert (got - ref).norm() <= 0.05 * ref.norm()


def test_one_call_per_step_only_where_it_fits(ops, tmp_path, tiny_spec):
    """More than 8 query heads per key/value head, or float32 activations: the model keeps one call per layer."""
    from tiny import random_state_dict

    spec = tiny_spec.but(dim=256, hidden_dim=256, n_heads=16, n_kv_heads=1, head_dim=16)
    folder = write_hf(tmp_path / "g16", spec, random_state_dict(spec), dtype=torch.bfloat16)
    assert use_kernels(load_model(folder, BF16, kernels=ops), ops) is None
    assert use_kernels(load_model(folder, FP32, quantize="int8", kernels=ops), ops) is None


def test_the_step_checks_what_the_c_code_trusts(ops, wide_model):
    model = load_model(wide_model, BF16, kernels=ops)
    cache = model.new_cache(64)
    cache.reserve(1)
    cos, sin = model.rope_rows(64, torch.device("cpu"))
    step = partial(ops.decode_token, use_kernels(model, ops).step)
    with pytest.raises(ValueError, match="layout the kernels read"):
        step(5, cos, sin, cache.k, cache.v, cache.capacity, 0)  # past the cache
    with pytest.raises(ValueError, match="layout the kernels read"):
        step(5, cos[:10], sin, cache.k, cache.v, 10, 0)  # past the RoPE table
    with pytest.raises(ValueError, match="layout the kernels read"):
        step(5, cos.float(), sin, cache.k, cache.v, 0, 0)
    with pytest.raises(ValueError, match="layout the kernels read"):
        step(5, cos, sin, cache.k[:-1], cache.v, 0, 0)
    with pytest.raises(ValueError, match="layout the kernels read"):
        step(5, cos, sin, [k.float() for k in cache.k], cache.v, 0, 0)
    with pytest.raises(IndexError, match="not in the vocabulary"):
        step(model.cfg.vocab_size, cos, sin, cache.k, cache.v, 0, 0)
