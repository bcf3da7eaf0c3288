"""Affine quantization math: the worked example, granularities, ranges, round trips and validation."""

from __future__ import annotations

import pytest
import torch

from hf_compress.quant.affine import (
    QuantSpec,
    broadcast_qparams,
    compute_qparams,
    dequantize,
    fake_quantize,
    integer_range,
    qparams_from_minmax,
    quantization_error,
    quantize,
    reduce_minmax,
)

X = torch.tensor([[1.2, 2.4, 3.6], [11.2, 12.4, 13.6]])


def randn(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


# --- the worked example ---------------------------------------------------------------------------


def test_worked_example_round():
    spec = QuantSpec(bits=8, symmetric=False)
    assert (spec.qmin, spec.qmax) == (-128, 127)
    s, z = compute_qparams(X, spec)
    assert s.dtype == torch.float32 and z.dtype == torch.int32 and s.shape == z.shape == ()
    assert s.item() == pytest.approx(12.4 / 255, rel=1e-6)
    assert z.item() == 153  # 152.68 rounded
    q = quantize(X, s, z, spec)
    assert q.dtype == torch.int32
    assert q.tolist() == [[-128, -104, -79], [77, 102, 127]]
    x_hat = dequantize(q, s, z, spec)
    assert x_hat.dtype == torch.float32
    expected = torch.tensor([[1.2157, 2.3827, 3.5984], [11.1843, 12.4000, 13.6157]])
    torch.testing.assert_close(x_hat, expected, atol=1e-4, rtol=0)
    err = quantization_error(X, x_hat)
    assert err.dtype == torch.float32 and err.shape == ()
    assert err.item() == pytest.approx(0.00104, abs=2e-5)


def test_worked_example_trunc():
    spec = QuantSpec(bits=8, symmetric=False, zero_rounding="trunc")
    s, z = compute_qparams(X, spec)
    assert s.item() == pytest.approx(12.4 / 255, rel=1e-6)
    assert z.item() == 152
    q = quantize(X, s, z, spec)
    assert q.tolist() == [[-127, -103, -78], [78, 103, 127]]  # 13.6 -> 128, clamped to 127
    x_hat = dequantize(q, s, z, spec)
    torch.testing.assert_close(x_hat, s * (q + 152).float())


def test_boundary_equations_hold():
    spec = QuantSpec(bits=8, symmetric=False)
    s, z = qparams_from_minmax(torch.tensor(1.2), torch.tensor(13.6), spec)
    zr = 1.2 / s.item() - spec.qmin
    assert s.item() * (spec.qmin + zr) == pytest.approx(1.2, rel=1e-5)
    assert s.item() * (spec.qmax + zr) == pytest.approx(13.6, rel=1e-5)


def test_zero_point_may_lie_outside_code_range():
    spec = QuantSpec(bits=4, symmetric=False, signed=False)  # codes [0, 15]
    x = torch.linspace(100.0, 101.0, 50)
    s, z = compute_qparams(x, spec)
    assert z.item() > spec.qmax  # far from the code range; torch's quantize ops would clamp it
    x_hat = fake_quantize(x, s, z, spec)
    assert (x - x_hat).abs().max() <= s / 2 + 1e-5


# --- ranges and symmetric parameters --------------------------------------------------------------


@pytest.mark.parametrize(
    "bits,signed,restricted,expected",
    [
        (8, True, False, (-128, 127)),
        (8, True, True, (-127, 127)),
        (8, False, False, (0, 255)),
        (8, False, True, (0, 254)),
        (4, True, False, (-8, 7)),
        (4, True, True, (-7, 7)),
        (2, True, False, (-2, 1)),
        (3, False, True, (0, 6)),
    ],
)
def test_integer_range(bits, signed, restricted, expected):
    assert integer_range(bits, signed, restricted) == expected
    spec = QuantSpec(bits, signed=signed, restricted=restricted)
    assert (spec.qmin, spec.qmax) == expected


def test_symmetric_restricted_vs_full():
    x = torch.tensor([-2.0, -1.0, 0.5, 1.27])
    full = QuantSpec(8, symmetric=True)
    restr = QuantSpec(8, symmetric=True, restricted=True)
    sf, zf = compute_qparams(x, full)
    sr, zr = compute_qparams(x, restr)
    assert zf.item() == 0 and zr.item() == 0
    assert sf.item() == pytest.approx(2.0 / 127) and sr.item() == pytest.approx(2.0 / 127)
    # -absmax maps to -127 in both; only the full range can reach -128 (values beyond the range).
    assert quantize(torch.tensor([-2.0]), sf, zf, full).item() == -127
    beyond = torch.tensor([-5.0, 5.0])
    assert quantize(beyond, sf, zf, full).tolist() == [-128, 127]
    assert quantize(beyond, sr, zr, restr).tolist() == [-127, 127]


def test_symmetric_unsigned_uses_midpoint_zero():
    x = torch.tensor([-3.0, 0.0, 1.5, 3.0])
    spec = QuantSpec(4, symmetric=True, signed=False)
    s, z = compute_qparams(x, spec)
    assert z.item() == -8 and s.item() == pytest.approx(3.0 / 7)
    assert quantize(x, s, z, spec).tolist() == [1, 8, 12, 15]  # 1.5/(3/7) = 3.5 -> 4 (half to even)
    spec_r = QuantSpec(4, symmetric=True, signed=False, restricted=True)  # codes [0, 14]
    s, z = compute_qparams(x, spec_r)
    assert z.item() == -7
    assert quantize(x, s, z, spec_r).tolist() == [0, 7, 11, 14]


@pytest.mark.parametrize("bits", range(2, 9))
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("signed", [True, False])
def test_round_trip_error_bound(bits, symmetric, signed):
    x = randn(64, 33, seed=bits) * 3 + (0.0 if symmetric else 1.5)
    spec = QuantSpec(bits, symmetric=symmetric, signed=signed)
    s, z = compute_qparams(x, spec)
    q = quantize(x, s, z, spec)
    assert q.min() >= spec.qmin and q.max() <= spec.qmax
    x_hat = dequantize(q, s, z, spec)
    assert ((x - x_hat).abs() <= s / 2 * (1 + 1e-5) + 1e-6).all()
    torch.testing.assert_close(fake_quantize(x, s, z, spec), x_hat, rtol=0, atol=0)


def test_fake_quantize_matches_and_keeps_dtype():
    x = randn(8, 16).to(torch.bfloat16)
    spec = QuantSpec(4, symmetric=False, granularity="group", group_size=8)
    s, z = compute_qparams(x, spec)
    fq = fake_quantize(x, s, z, spec)
    assert fq.dtype == torch.bfloat16 and fq.shape == x.shape
    assert torch.equal(fq, dequantize(quantize(x, s, z, spec), s, z, spec).to(torch.bfloat16))


def test_clip_ratio_shrinks_range():
    x = randn(100)
    spec = QuantSpec(8, symmetric=False)
    s1, _ = compute_qparams(x, spec)
    s2, _ = compute_qparams(x, spec, clip_ratio=0.5)
    assert s2.item() == pytest.approx(s1.item() * 0.5, rel=1e-5)
    for bad in (0.0, 1.5, -0.1):
        with pytest.raises(ValueError, match="clip_ratio"):
            compute_qparams(x, spec, clip_ratio=bad)


def test_all_equal_inputs_give_no_nan():
    for spec in (QuantSpec(8), QuantSpec(8, symmetric=False), QuantSpec(3, symmetric=False, signed=False)):
        for value in (0.0, 5.0, -1e-3, 1e6):
            x = torch.full((4, 4), value)
            s, z = compute_qparams(x, spec)
            assert s.item() > 0
            x_hat = fake_quantize(x, s, z, spec)
            assert torch.isfinite(x_hat).all()
            torch.testing.assert_close(x_hat, x, rtol=1e-5, atol=1e-6)


def test_nan_or_inf_rejected():
    spec = QuantSpec(8)
    for bad in (float("nan"), float("inf")):
        x = torch.tensor([1.0, bad])
        with pytest.raises(ValueError, match="NaN or inf"):
            compute_qparams(x, spec)
    with pytest.raises(ValueError, match="NaN or inf"):
        qparams_from_minmax(torch.tensor(float("nan")), torch.tensor(1.0), spec)
    with pytest.raises(ValueError, match="min_val must be <= max_val"):
        qparams_from_minmax(torch.tensor(2.0), torch.tensor(1.0), spec)


# --- granularities --------------------------------------------------------------------------------


@pytest.mark.parametrize("axis", [0, 1, -1])
def test_per_channel_2d(axis):
    x = randn(6, 10)
    spec = QuantSpec(8, symmetric=False, granularity="channel", axis=axis)
    lo, hi = reduce_minmax(x, spec)
    ax = axis % 2
    assert lo.shape == (x.shape[ax],)
    s, z = compute_qparams(x, spec)
    for c in range(x.shape[ax]):
        sl = x.select(ax, c)
        sc, zc = compute_qparams(sl, QuantSpec(8, symmetric=False))
        assert s[c].item() == sc.item() and z[c].item() == zc.item()
    q = quantize(x, s, z, spec)
    for c in range(x.shape[ax]):
        sl = x.select(ax, c)
        assert torch.equal(q.select(ax, c), quantize(sl, s[c], z[c], QuantSpec(8, symmetric=False)))


def test_per_channel_3d_middle_axis():
    x = randn(3, 5, 7)
    spec = QuantSpec(4, symmetric=True, granularity="channel", axis=1)
    s, z = compute_qparams(x, spec)
    assert s.shape == z.shape == (5,)
    expected = x.abs().amax(dim=(0, 2)) / 7
    torch.testing.assert_close(s, expected)
    b = broadcast_qparams(s, x.shape, spec)
    assert b.shape == x.shape and torch.equal(b[2, :, 4], s)
    x_hat = fake_quantize(x, s, z, spec)
    assert ((x - x_hat).abs() <= b / 2 + 1e-6).all()


@pytest.mark.parametrize("in_features,group_size,sizes", [(12, 4, [4, 4, 4]), (10, 4, [4, 4, 2]), (5, 8, [5])])
def test_per_group(in_features, group_size, sizes):
    x = randn(3, in_features, seed=in_features)
    spec = QuantSpec(4, symmetric=False, signed=False, granularity="group", group_size=group_size)
    lo, hi = reduce_minmax(x, spec)
    assert lo.shape == (3, len(sizes))
    s, z = compute_qparams(x, spec)
    assert s.shape == z.shape == (3, len(sizes))
    q = quantize(x, s, z, spec)
    per_tensor = QuantSpec(4, symmetric=False, signed=False)
    start = 0
    for g, size in enumerate(sizes):
        for r in range(3):
            sl = x[r, start : start + size]
            sg, zg = compute_qparams(sl, per_tensor)
            assert s[r, g].item() == sg.item() and z[r, g].item() == zg.item()
            assert torch.equal(q[r, start : start + size], quantize(sl, sg, zg, per_tensor))
        start += size
    b = broadcast_qparams(s, x.shape, spec)
    assert b.shape == x.shape
    assert torch.equal(b[:, -sizes[-1] :], s[:, -1:].expand(3, sizes[-1]))


def test_group_on_3d_tensor():
    x = randn(2, 3, 10)
    spec = QuantSpec(8, granularity="group", group_size=4)
    s, z = compute_qparams(x, spec)
    assert s.shape == (2, 3, 3)
    torch.testing.assert_close(s[1, 2, 2], x[1, 2, 8:].abs().max() / 127)


def test_broadcast_accepts_full_shape_and_rejects_mismatch():
    x = randn(4, 6)
    spec = QuantSpec(8, granularity="channel", axis=0)
    s, z = compute_qparams(x, spec)
    full = broadcast_qparams(s, x.shape, spec)
    assert broadcast_qparams(full, x.shape, spec) is full
    # per-tensor spec with already-expanded parameters (the RTN/GPTQ call pattern)
    assert torch.equal(quantize(x, full, z[:, None].expand(4, 6), QuantSpec(8)), quantize(x, s, z, spec))
    with pytest.raises(ValueError, match="do not match granularity"):
        broadcast_qparams(torch.ones(5), x.shape, spec)
    with pytest.raises(ValueError, match="do not match granularity"):
        broadcast_qparams(torch.ones(4, 3), x.shape, QuantSpec(8, granularity="group", group_size=4))


def test_channel_axis_out_of_range():
    with pytest.raises(ValueError, match="out of range"):
        reduce_minmax(randn(3, 4), QuantSpec(8, granularity="channel", axis=2))


# --- validation -----------------------------------------------------------------------------------


@pytest.mark.parametrize("bits", [1, 9, 0, 4.0, True])
def test_bad_bits(bits):
    with pytest.raises(ValueError, match=r"bits must be an integer in 2\.\.8"):
        QuantSpec(bits=bits)
    with pytest.raises(ValueError, match=r"bits must be an integer in 2\.\.8"):
        integer_range(bits)


def test_bad_spec_fields():
    with pytest.raises(ValueError, match="group_size must be a positive integer"):
        QuantSpec(4, granularity="group", group_size=0)
    with pytest.raises(ValueError, match="granularity must be one of"):
        QuantSpec(4, granularity="row")
    with pytest.raises(ValueError, match="needs group_size"):
        QuantSpec(4, granularity="group")
    with pytest.raises(ValueError, match="zero_rounding must be one of"):
        QuantSpec(4, zero_rounding="floor")
    with pytest.raises(ValueError, match="symmetric must be a bool"):
        QuantSpec(4, symmetric="yes")


def test_error_message_text():
    with pytest.raises(ValueError) as e:
        QuantSpec(bits=9)
    assert str(e.value) == "bits must be an integer in 2..8, got 9"


def test_empty_input_rejected():
    with pytest.raises(ValueError, match="empty"):
        compute_qparams(torch.empty(0, 4), QuantSpec(8))


def test_spec_is_frozen_and_hashable():
    spec = QuantSpec(4, granularity="group", group_size=128)
    with pytest.raises(AttributeError):
        spec.bits = 8
    assert hash(spec) == hash(QuantSpec(4, granularity="group", group_size=128))


def test_all_finite_checks_every_chunk_and_layout():
    from hf_compress.quant import affine

    x = torch.zeros(3 * affine._FINITE_CHUNK // 1024 + 1, 1024)  # spans four chunks
    assert affine.all_finite(x) and affine.all_finite(x.mT)  # a column-major view is read without a copy
    for bad in (float("nan"), float("inf"), float("-inf")):
        y = x.clone()
        y[-1, -1] = bad  # in the last chunk only
        assert not affine.all_finite(y) and not affine.all_finite(y.mT) and not affine.all_finite(y[:, 1::2][:, -1:])  # strided: copied, still checked
