"""The C++ CPU kernel for packed ternary / binary layers (hf_compress.kernels.cpu.lowbit) against
``lowbit_linear_reference``, on every code path this CPU has (scalar, AVX2, AVX512-VNNI, the int8-GEMM route
for large batches) and the automatic choice.

The integer sums are exact and the epilogue repeats the reference's operations, so float32 outputs are
compared with rtol 1e-6 (they match bit for bit in practice); bfloat16 outputs with one bf16 rounding, and
separately checked to be the float32 result rounded (so their integer sums are exact too).
"""

from __future__ import annotations

import itertools

import pytest
import torch

from hf_compress.kernels.cpu import lowbit as klowbit
from hf_compress.quant.int8 import quantize_rows
from hf_compress.quant.lowbit import lowbit_linear_reference, pack_binary, pack_ternary, padded_width

if not klowbit.available():
    pytest.skip(f"the low-bit C++ kernel is not available: {klowbit.unavailable_reason()}", allow_module_level=True)

# Every tile path up to the best this CPU has (scalar < AVX2 < AVX512-VNNI), the int8-GEMM route, auto.
ISAS = [*range(klowbit.best_isa() + 1), klowbit.ISA_INT_MM, klowbit.ISA_AUTO]
MS = (1, 2, 3, 7, 16, 33)
KS = (64, 256, 300, 704, 2048)
NS = (1, 5, 64, 257)
F32_TOL = dict(rtol=1e-6, atol=1e-6)
BF16_TOL = dict(rtol=2**-7, atol=1e-5)


def make_weights(bits: int, n: int, k: int, per_channel: bool, gen: torch.Generator):
    """(codes int8 [n, k], qweight, w_scale)."""
    if bits == 2:
        codes = torch.randint(-1, 2, (n, k), generator=gen).to(torch.int8)
        qweight = pack_ternary(codes)
    else:
        codes = (torch.randint(0, 2, (n, k), generator=gen) * 2 - 1).to(torch.int8)
        qweight = pack_binary(codes)
    w_scale = torch.rand(n if per_channel else 1, generator=gen) + 0.5
    return codes, qweight, w_scale


def run(x, qweight, w_scale, in_scale, bias, bits, k, isa):
    return klowbit.lowbit_linear_cpu(x, qweight, w_scale, in_scale, bias, bits, k, isa)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("bits", [2, 1], ids=["ternary", "binary"])
def test_matches_reference_all_shapes_and_paths(bits, dtype):
    gen = torch.Generator().manual_seed(bits)
    tol = F32_TOL if dtype == torch.float32 else BF16_TOL
    for i, (m, k, n) in enumerate(itertools.product(MS, KS, NS)):
        # Options cycle with the shape index, so every combination meets many shapes.
        per_channel, with_in_scale, with_bias = bool(i & 1), bool(i & 2), bool(i & 4)
        _, qweight, w_scale = make_weights(bits, n, k, per_channel, gen)
        in_scale = torch.rand(k, generator=gen) + 0.5 if with_in_scale else None
        bias = torch.randn(n, generator=gen) if with_bias else None
        x = (torch.randn(m, k, generator=gen) * 3).to(dtype)
        x[m // 2] = 0  # an all-zero row (scale 1, codes 0)
        ref = lowbit_linear_reference(x, qweight, w_scale, in_scale, bias, bits, k)
        for isa in ISAS:
            out = run(x, qweight, w_scale, in_scale, bias, bits, k, isa)
            what = f"bits={bits} M={m} K={k} N={n} isa={isa} per_channel={per_channel} in_scale={with_in_scale} bias={with_bias}"
            assert out.dtype == dtype and out.shape == (m, n), what
            torch.testing.assert_close(out, ref, **tol, msg=lambda s, what=what: f"{what}: {s}")
            zero_row = bias.to(dtype) if bias is not None else torch.zeros(n, dtype=dtype)
            assert torch.equal(out[m // 2], zero_row), what


@pytest.mark.parametrize("bits", [2, 1], ids=["ternary", "binary"])
@pytest.mark.parametrize("isa", ISAS)
def test_integer_sums_exact(bits, isa):
    """Integer activations with absmax 127 quantize to themselves (scale 1): with w_scale 1 the float32 output
    is the integer dot product, exactly."""
    gen = torch.Generator().manual_seed(3)
    m, k, n = 9, 2048 + 300, 67
    codes, qweight, _ = make_weights(bits, n, k, False, gen)
    x = torch.randint(-127, 128, (m, k), generator=gen).float()
    x[:, 5] = 127.0
    q, s = quantize_rows(x)
    assert torch.equal(s, torch.ones(m)) and torch.equal(q.float(), x)
    expect = (x.double() @ codes.double().t()).float()
    out = run(x, qweight, torch.ones(1), None, None, bits, k, isa)
    assert torch.equal(out, expect)


@pytest.mark.parametrize("bits", [2, 1], ids=["ternary", "binary"])
@pytest.mark.parametrize("isa", ISAS)
def test_bf16_is_float32_rounded(bits, isa):
    """bf16 -> float32 is exact, so a bf16 input gives the same codes and sums as its float32 copy: the bf16
    output is the float32 output rounded to bf16, bit for bit."""
    gen = torch.Generator().manual_seed(4)
    m, k, n = 5, 704, 130
    _, qweight, w_scale = make_weights(bits, n, k, True, gen)
    in_scale, bias = torch.rand(k, generator=gen) + 0.5, torch.randn(n, generator=gen)
    x = torch.randn(m, k, generator=gen).to(torch.bfloat16)
    out = run(x, qweight, w_scale, in_scale, bias, bits, k, isa)
    out32 = run(x.float(), qweight, w_scale, in_scale, bias, bits, k, isa)
    assert torch.equal(out, out32.to(torch.bfloat16))


@pytest.mark.parametrize("bits", [2, 1], ids=["ternary", "binary"])
def test_option_combinations(bits):
    gen = torch.Generator().manual_seed(5)
    m, k, n = 4, 300, 33
    for per_channel, with_in_scale, bias_dtype in itertools.product(
        (False, True), (False, True), (None, torch.float32, torch.bfloat16, torch.float16)
    ):
        _, qweight, w_scale = make_weights(bits, n, k, per_channel, gen)
        in_scale = torch.rand(k, generator=gen) + 0.5 if with_in_scale else None
        bias = None if bias_dtype is None else torch.randn(n, generator=gen).to(bias_dtype)
        x = torch.randn(m, k, generator=gen)
        ref = lowbit_linear_reference(x, qweight, w_scale, in_scale, bias, bits, k)
        for isa in ISAS:
            torch.testing.assert_close(run(x, qweight, w_scale, in_scale, bias, bits, k, isa), ref, **F32_TOL)


def test_leading_dims_strided_input_and_other_dtypes():
    gen = torch.Generator().manual_seed(6)
    k, n = 256 + 64, 20
    _, qweight, w_scale = make_weights(2, n, k, True, gen)
    bias = torch.randn(n, generator=gen)
    x3 = torch.randn(2, 3, k, generator=gen)
    out = run(x3, qweight, w_scale, None, bias, 2, k, klowbit.ISA_AUTO)
    assert out.shape == (2, 3, n)
    torch.testing.assert_close(out, lowbit_linear_reference(x3, qweight, w_scale, None, bias, 2, k), **F32_TOL)
    wide = torch.randn(4, k + 7, generator=gen)
    xs = wide[:, 3 : 3 + k]  # rows not contiguous
    torch.testing.assert_close(
        run(xs, qweight, w_scale, None, bias, 2, k, klowbit.ISA_AUTO),
        lowbit_linear_reference(xs, qweight, w_scale, None, bias, 2, k),
        **F32_TOL,
    )
    for dtype in (torch.float16, torch.float64):  # computed in float32, returned in x's dtype
        xd = torch.randn(3, k, generator=gen).to(dtype)
        out = run(xd, qweight, w_scale, None, bias, 2, k, klowbit.ISA_AUTO)
        assert out.dtype == dtype
        torch.testing.assert_close(out, lowbit_linear_reference(xd, qweight, w_scale, None, bias, 2, k))


def test_threads_do_not_change_results():
    gen = torch.Generator().manual_seed(7)
    k, n = 2048, 1024
    _, qweight, w_scale = make_weights(2, n, k, True, gen)
    x = torch.randn(20, k, generator=gen)
    threads = torch.get_num_threads()
    outs = []
    try:
        for t in (1, 2):
            torch.set_num_threads(t)
            outs.append([run(x[:m], qweight, w_scale, None, None, 2, k, klowbit.ISA_AUTO) for m in (1, 3, 20)])
    finally:
        torch.set_num_threads(threads)
    for a, b in zip(*outs, strict=True):
        assert torch.equal(a, b)


def test_empty_batch():
    _, qweight, w_scale = make_weights(1, 8, 100, False, torch.Generator().manual_seed(8))
    out = run(torch.zeros(0, 100), qweight, w_scale, None, None, 1, 100, klowbit.ISA_AUTO)
    assert out.shape == (0, 8)


def test_bad_arguments_raise():
    k, n = 300, 8
    _, qweight, w_scale = make_weights(2, n, k, False, torch.Generator().manual_seed(9))
    x = torch.randn(2, k)
    assert qweight.shape[1] == padded_width(k, 2) // 4
    with pytest.raises(RuntimeError, match="bits"):
        run(x, qweight, w_scale, None, None, 3, k, -1)
    with pytest.raises(RuntimeError, match="qweight"):
        run(x, qweight[:, :64], w_scale, None, None, 2, k, -1)
    with pytest.raises(RuntimeError, match="qweight"):
        run(x, qweight, w_scale, None, None, 1, k, -1)  # a ternary tensor read as binary: wrong width
    with pytest.raises(RuntimeError, match="x must be"):
        run(x[:, :-1], qweight, w_scale, None, None, 2, k, -1)
    with pytest.raises(RuntimeError, match="w_scale"):
        run(x, qweight, torch.ones(3), None, None, 2, k, -1)
    with pytest.raises(RuntimeError, match="in_scale"):
        run(x, qweight, w_scale, torch.ones(k - 1), None, 2, k, -1)
    with pytest.raises(RuntimeError, match="bias"):
        run(x, qweight, w_scale, None, torch.ones(n + 1), 2, k, -1)
    with pytest.raises(RuntimeError, match="isa"):
        run(x, qweight, w_scale, None, None, 2, k, 9)


def test_fake_tensor_shapes():
    """The registered fake implementation: shape and dtype only (what torch.compile traces with)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        x = torch.empty(2, 3, 300, dtype=torch.bfloat16)
        qweight = torch.empty(17, padded_width(300, 1) // 8, dtype=torch.uint8)
        out = torch.ops.hf_compress_lowbit.linear(x, qweight, torch.empty(1), None, None, 1, 300)
    assert out.shape == (2, 3, 17) and out.dtype == torch.bfloat16
