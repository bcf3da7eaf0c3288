"""GPTQ on one linear layer (hf_compress.methods.gptq): exactness, error vs RTN, act-order, edge cases."""

from __future__ import annotations

import logging
import math

import pytest
import torch

from hf_compress.methods.gptq import GPTQ
from hf_compress.methods.rtn import codes_for, group_qparams, qparams_from_range, rtn_quantize, weight_spec
from hf_compress.quant.affine import reduce_minmax
from hf_compress.quant.layout import default_g_idx


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _correlated(rows: int, n: int, seed: int, col_scale: torch.Tensor | None = None) -> torch.Tensor:
    g = _gen(seed)
    x = torch.randn(rows, n, generator=g) @ (torch.randn(n, n, generator=g) / n**0.5)
    return x if col_scale is None else x * col_scale


def _gptq(x: torch.Tensor, **kw) -> GPTQ:
    q = GPTQ(x.shape[-1], **kw)
    q.add_batch(x)
    return q


def _tr(D: torch.Tensor, H: torch.Tensor) -> float:
    """tr(D H D^T) in float64."""
    D, H = D.double(), H.double()
    return ((D @ H) * D).sum().item()


def _err(weight: torch.Tensor, qw, H: torch.Tensor) -> float:
    return _tr(weight.float() - qw.dequantize().float(), H)


def _same(a, b) -> None:
    for name in ("codes", "scales", "zeros", "g_idx"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name


@pytest.mark.parametrize(
    "bits,group_size,sym,dtype,observer",
    [
        (4, -1, True, torch.float32, "minmax"),
        (3, 32, False, torch.float32, "minmax"),
        (2, 64, True, torch.float16, "minmax"),
        (8, 48, False, torch.bfloat16, "minmax"),
        (3, 48, False, torch.float32, "mse"),
        (4, -1, True, torch.float16, "mse"),
    ],
)
def test_identity_hessian_equals_rtn(bits, group_size, sym, dtype, observer):
    n = 128
    W = torch.randn(96, n, generator=_gen(0)).to(dtype)
    q = _gptq(3.0 * torch.eye(n))  # H = 2/n * 9 I: no off-diagonal error feedback
    r = q.quantize(W, bits, group_size, sym=sym, observer=observer)
    _same(r.weight, rtn_quantize(W, bits, group_size, sym=sym, observer=observer))
    assert r.weight.scales.dtype == dtype


@pytest.mark.parametrize("sym", [True, False])
def test_mse_observer_takes_the_least_error_clipped_range(sym):
    # reference: every candidate range [lo, hi] * (1 - k/100), k = 0..20, on every group at once; the first
    # (widest) of the least-error candidates wins. Groups of 64 over 200 columns: the last one has 8.
    bits, gs = 3, 64
    W = torch.randn(48, 200, generator=_gen(3)) * torch.exp(torch.randn(48, 200, generator=_gen(4)))  # heavy tails
    s, z = group_qparams(W, bits, gs, sym, torch.float32, observer="mse")
    s0, z0 = group_qparams(W, bits, gs, sym, torch.float32)
    g_idx = default_g_idx(200, gs)

    def group_err(scales, zeros):
        dq = (codes_for(W, scales, zeros, g_idx, bits) - zeros[:, g_idx]).float() * scales[:, g_idx]
        return torch.zeros_like(scales).index_add_(1, g_idx.long(), (dq - W).square())

    lo, hi = reduce_minmax(W, weight_spec(bits, gs, 200, sym))
    cands = [qparams_from_range(lo * (1 - k / 100), hi * (1 - k / 100), bits, sym, torch.float32) for k in range(21)]
    errs = torch.stack([group_err(cs, cz) for cs, cz in cands])
    pick = errs.argmin(dim=0)
    assert torch.equal(s, torch.stack([c[0] for c in cands]).gather(0, pick[None])[0])
    assert torch.equal(z, torch.stack([c[1] for c in cands]).gather(0, pick[None])[0])
    e, e0 = group_err(s, z), group_err(s0, z0)
    assert torch.allclose(e, errs.min(dim=0).values, rtol=1e-5) and (e <= e0 * (1 + 1e-6)).all()
    assert e.sum() < 0.9 * e0.sum() and (pick > 0).float().mean() > 0.5  # heavy tails: most groups clip


@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("group_size", [-1, 64])
@pytest.mark.parametrize("sym", [True, False])
def test_beats_rtn_and_relative_error_is_direct(bits, group_size, sym):
    n = 128
    x = _correlated(512, n, seed=bits)
    W = torch.randn(64, n, generator=_gen(1))
    q = _gptq(x)
    r = q.quantize(W, bits, group_size, sym=sym)
    assert _err(W, r.weight, q.H) < 0.9 * _err(W, rtn_quantize(W, bits, group_size, sym=sym), q.H)
    Wd = r.weight.dequantize().double()
    X = x.double()
    direct = ((W.double() - Wd) @ X.t()).square().sum() / (W.double() @ X.t()).square().sum()
    assert r.relative_error == pytest.approx(direct.item(), rel=1e-3)
    assert r.damp == pytest.approx(0.01 * torch.diag(q.H).mean().item(), rel=1e-6)


@pytest.mark.parametrize(
    "bits,scale_dtype,desc_act", [(4, None, False), (8, torch.bfloat16, False), (8, torch.bfloat16, True)]
)
def test_loss_matches_damped_error_of_stored_weight(bits, scale_dtype, desc_act):
    # Delta = E U for the Cholesky factor U of H_damped^-1, so 2*loss = tr(Delta H_damped Delta^T) holds only if
    # the error feedback used exactly the dequantized values (bf16 scales rounded as stored, 8 bits: ~15% off if not)
    n = 128
    q = _gptq(_correlated(512, n, seed=5))
    W = torch.randn(64, n, generator=_gen(2))
    r = q.quantize(W, bits, 32, desc_act=desc_act, scale_dtype=scale_dtype)
    assert r.weight.scales.dtype == (scale_dtype or torch.float32)
    assert 2 * r.loss == pytest.approx(_err(W, r.weight, q.H + r.damp * torch.eye(n)), rel=1e-4)


def _uneven(n: int, seed: int) -> GPTQ:
    col_scale = torch.exp(torch.randn(n, generator=_gen(100 + seed)) * 1.5)
    return _gptq(_correlated(512, n, seed, col_scale))


@pytest.mark.parametrize("n,group_size", [(128, 32), (200, 64)])
def test_desc_act_g_idx_and_error(n, group_size):
    q = _uneven(n, seed=0)
    W = torch.randn(64, n, generator=_gen(3))
    r = q.quantize(W, 4, group_size, desc_act=True)
    qw, n_groups = r.weight, -(-n // group_size)
    perm = torch.argsort(torch.diag(q.H), descending=True, stable=True)
    assert not torch.equal(perm, torch.arange(n))  # act-order really permutes here
    assert torch.equal(qw.g_idx[perm].long(), torch.arange(n) // group_size)
    sizes = torch.bincount(qw.g_idx.long(), minlength=n_groups).tolist()
    assert sizes[:-1] == [group_size] * (n_groups - 1) and sizes[-1] == n - group_size * (n_groups - 1)
    assert qw.scales.shape == qw.zeros.shape == (64, n_groups)
    # dequantize() with this g_idx is the weight GPTQ optimised: better than RTN and than without act-order
    e_desc = _err(W, qw, q.H)
    assert e_desc < 0.9 * _err(W, rtn_quantize(W, 4, group_size), q.H)
    assert e_desc < 0.9 * _err(W, q.quantize(W, 4, group_size).weight, q.H)
    assert r.relative_error == pytest.approx(e_desc / _tr(W, q.H), rel=1e-4)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_desc_act_lowers_error_with_uneven_columns(seed):
    n = 128
    q = _uneven(n, seed)
    W = torch.randn(64, n, generator=_gen(10 + seed))
    for bits, gs in [(3, -1), (4, -1), (3, 32)]:
        plain = q.quantize(W, bits, gs).relative_error
        assert q.quantize(W, bits, gs, desc_act=True).relative_error < 0.95 * plain


def test_static_groups_natural_g_idx_and_rtn_params():
    n, gs = 200, 64
    q = _uneven(n, seed=1)
    W = torch.randn(48, n, generator=_gen(4))
    rtn = rtn_quantize(W, 3, gs, sym=False)
    for desc_act in (False, True):
        qw = q.quantize(W, 3, gs, sym=False, desc_act=desc_act, static_groups=True).weight
        assert torch.equal(qw.g_idx, torch.arange(n, dtype=torch.int32) // gs)
        # group params from the weight before any error feedback: the RTN ones
        assert torch.equal(qw.scales, rtn.scales) and torch.equal(qw.zeros, rtn.zeros)
        assert _err(W, qw, q.H) < 0.9 * _err(W, rtn, q.H)


def test_non_dividing_group_size():
    n, gs = 200, 64
    q = _gptq(_correlated(400, n, seed=2))
    W = torch.randn(32, n, generator=_gen(5))
    r = q.quantize(W, 4, gs, sym=False)
    qw = r.weight
    assert qw.scales.shape == qw.zeros.shape == (32, 4)
    assert torch.bincount(qw.g_idx.long()).tolist() == [64, 64, 64, 8]
    assert qw.codes.shape == (32, n) and qw.codes.dtype == torch.int32
    assert int(qw.codes.min()) >= 0 and int(qw.codes.max()) <= 15
    assert _err(W, qw, q.H) < 0.9 * _err(W, rtn_quantize(W, 4, gs, sym=False), q.H)
    assert r.relative_error == pytest.approx(_err(W, qw, q.H) / _tr(W, q.H), rel=1e-4)


@pytest.mark.parametrize("sym", [True, False])
@pytest.mark.parametrize("desc_act", [False, True])
def test_dead_input_column(sym, desc_act):
    n = 64
    x = _correlated(256, n, seed=3)
    x[:, [5, 40]] = 0
    W = torch.randn(32, n, generator=_gen(6))
    q = _gptq(x)
    r = q.quantize(W, 4, 16, sym=sym, desc_act=desc_act)
    Wd = r.weight.dequantize()
    assert torch.isfinite(Wd).all() and math.isfinite(r.loss) and math.isfinite(r.relative_error)
    assert (Wd[:, [5, 40]] == 0).all()
    assert 0 < r.relative_error < 0.1


def test_cholesky_retry_warns_and_succeeds(caplog):
    n = 64
    g = _gen(7)
    Qm, _ = torch.linalg.qr(torch.randn(n, n, generator=g))
    eig = torch.rand(n, generator=g) + 0.5
    eig[0] = -0.05 * eig.mean()  # not PD with 1% damping, PD with 10%
    q = GPTQ(n)
    q.H, q.nsamples = (Qm * eig) @ Qm.t(), 1
    W = torch.randn(16, n, generator=g)
    with caplog.at_level(logging.WARNING, logger="hf_compress.methods.gptq"):
        r = q.quantize(W, 4)
    mean_diag = torch.diag(q.H).mean().item()
    assert r.damp == pytest.approx(0.1 * mean_diag, rel=1e-5)
    assert f"{r.damp:.3g}" in caplog.text and "not positive definite" in caplog.text
    assert torch.isfinite(r.weight.dequantize()).all() and math.isfinite(r.loss)


def test_rank_deficient_without_damping_retries(caplog):
    n = 64
    q = _gptq(torch.randn(8, n, generator=_gen(8)))  # rank 8 Hessian, singular with damp_percent=0
    W = torch.randn(16, n, generator=_gen(9))
    with caplog.at_level(logging.WARNING, logger="hf_compress.methods.gptq"):
        r = q.quantize(W, 4, damp_percent=0.0)
    assert r.damp > 0 and "retrying with damping" in caplog.text
    assert torch.isfinite(r.weight.dequantize()).all() and 0 <= r.relative_error < 0.1


def test_cholesky_failure_raises():
    n = 64
    eig = torch.ones(n)
    eig[0] = -0.8 * eig[1:].sum()  # mean diagonal > 0, but even 10000x of 1% of it cannot make H PD
    q = GPTQ(n)
    q.H, q.nsamples = torch.diag(eig), 1
    with pytest.raises(ValueError, match="Cholesky of the Hessian failed"):
        q.quantize(torch.randn(8, n), 4)


def test_deterministic():
    n = 128
    x = _correlated(300, n, seed=4)
    W = torch.randn(64, n, generator=_gen(11)).half()
    kw = dict(bits=3, group_size=32, sym=False, desc_act=True)
    a = _gptq(x).quantize(W, **kw)
    q = _gptq(x)
    b, c = q.quantize(W, **kw), q.quantize(W, **kw)
    _same(a.weight, b.weight)
    _same(b.weight, c.weight)
    assert a.loss == b.loss == c.loss and a.relative_error == b.relative_error


def test_errors():
    n = 32
    q = GPTQ(n)
    W = torch.randn(8, n)
    with pytest.raises(ValueError, match="no calibration data"):
        q.quantize(W, 4)
    q.add_batch(torch.randn(16, n))
    with pytest.raises(ValueError, match="unsupported bits=5"):
        q.quantize(W, 5)
    with pytest.raises(ValueError, match="16 input features but the Hessian was built for 32"):
        q.quantize(torch.randn(8, 16), 4)
    with pytest.raises(ValueError, match="2-D weight"):
        q.quantize(torch.randn(2, 8, n), 4)
    bad = W.clone()
    bad[1, 2] = float("nan")
    with pytest.raises(ValueError, match="NaN or inf"):
        q.quantize(bad, 4)
    with pytest.raises(ValueError, match="group_size"):
        q.quantize(W, 4, group_size=0)
    with pytest.raises(ValueError, match=r"inputs \[\.\.\., 32\]"):
        q.add_batch(torch.randn(4, 31))
    with pytest.raises(ValueError, match="hessian_dtype"):
        GPTQ(n, hessian_dtype=torch.float16)
    nan_x = torch.randn(4, n)
    nan_x[0, 0] = float("inf")
    q2 = _gptq(nan_x)
    with pytest.raises(ValueError, match="Hessian"):
        q2.quantize(W, 4)
    q.free()
    with pytest.raises(ValueError, match="freed"):
        q.quantize(W, 4)


@pytest.mark.parametrize("hessian_dtype", [torch.float32, torch.float64])
def test_add_batch_accumulation(hessian_dtype):
    n = 48
    g = _gen(12)
    batches = [
        torch.randn(2, 5, n, generator=g),
        torch.randn(7, n, generator=g).half(),
        torch.randn(1, 3, 4, n, generator=g),
    ]
    q = GPTQ(n, hessian_dtype=hessian_dtype)
    for b in batches:
        q.add_batch(b)
    q.add_batch(torch.randn(0, n))  # an empty batch changes nothing
    X = torch.cat([b.reshape(-1, n).double() for b in batches])
    assert q.nsamples == X.shape[0] == 29
    assert q.H.dtype == hessian_dtype
    tol = 1e-5 if hessian_dtype == torch.float32 else 1e-12
    assert torch.allclose(q.H.double(), 2 / X.shape[0] * X.t() @ X, rtol=tol, atol=tol)


@pytest.mark.parametrize("desc_act", [False, True])
def test_shared_hessian_factored_once_and_left_intact(desc_act):
    # Linears sharing an input (q/k/v) share a GPTQ object: the factorisation is computed once and reused,
    # giving exactly what a fresh object gives, and the Hessian itself (damped and factored in place without
    # act-order) comes back bit-identical, dead inputs included.
    torch.manual_seed(0)
    n = 64
    X = torch.randn(512, n)
    X[:, 5] = 0  # a dead input
    ws = [torch.randn(32, n) for _ in range(3)]
    shared = GPTQ(n)
    shared.add_batch(X)
    H_before = shared.H.clone()
    results = [shared.quantize(w, 4, 16, desc_act=desc_act) for w in ws]
    assert torch.equal(shared.H, H_before)
    assert len(shared._factors) == 1
    for w, r in zip(ws, results, strict=True):
        fresh = GPTQ(n)
        fresh.add_batch(X)
        f = fresh.quantize(w, 4, 16, desc_act=desc_act)
        assert torch.equal(f.weight.pack()["qweight"], r.weight.pack()["qweight"])
        assert f.loss == r.loss and f.relative_error == r.relative_error
    shared.add_batch(X[:10])  # new data invalidates the factorisation
    assert shared._factors == {}


def test_uses_frees_the_hessian_after_the_last_weight():
    # A GPTQ told it serves 2 weights gives the same codes as an unbounded one, and frees its Hessian and factor
    # after the second quantize (before the caller builds its layer); a third call says the object was freed.
    torch.manual_seed(0)
    n = 64
    X = torch.randn(512, n)
    ws = [torch.randn(32, n) for _ in range(2)]
    bounded, kept = GPTQ(n, uses=2), GPTQ(n)
    bounded.add_batch(X)
    kept.add_batch(X)
    for i, w in enumerate(ws):
        a, b = bounded.quantize(w, 4, 16), kept.quantize(w, 4, 16)
        _same(a.weight, b.weight)
        assert a.relative_error == b.relative_error
        assert (bounded.H is None) == (i == 1)
    assert bounded._factors == {} and kept.H is not None
    with pytest.raises(ValueError, match="was freed"):
        bounded.quantize(ws[0], 4, 16)
    with pytest.raises(ValueError, match="uses must be a positive integer"):
        GPTQ(n, uses=0)


def test_relative_output_error_in_row_chunks_equals_the_formula():
    # 600 rows span three chunks of relative_output_error; the value is tr(D H D^T) / tr(W H W^T) in float64.
    from hf_compress.methods.gptq import ROW_CHUNK, relative_output_error

    W = torch.randn(600, 48, generator=_gen(3))
    assert W.shape[0] > 2 * ROW_CHUNK
    approx = W + 0.01 * torch.randn(600, 48, generator=_gen(4))
    H = 2 / 256 * (lambda x: x.t() @ x)(_correlated(256, 48, seed=6))
    expected = _tr(W - approx, H) / _tr(W, H)
    assert relative_output_error(W, approx, H) == pytest.approx(expected, rel=1e-5)
