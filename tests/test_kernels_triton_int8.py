"""The Triton int8 kernels (``hf_compress.kernels.triton.int8``) against plain-torch references.

As in ``test_kernels_triton.py``: without a GPU the kernels run in Triton's CPU interpreter, which must be
switched on (``TRITON_INTERPRET=1``) before triton is first imported and would turn every other triton
kernel of the session into interpreted code, so the interpreter cases run in one subprocess (this file
with ``--worker``) and each test checks one of its results. Tests marked ``gpu`` run the compiled kernels.

References: ``v = x.float() / smooth``, outlier columns zeroed, ``row_scale = absmax / 127`` (1 for rows of
zeros) or the static scale, ``q = clamp(round(v / row_scale), -127, 127)``; the GEMM in float64 (exact
for int8 products at these sizes) with the scales and bias applied in float64.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent


# ---------------------------------------------------------------------------------------------- references
def ref_quantize(x, smooth=None, scale=None, outlier_cols=None):
    """``(q int8, row_scale float32, ratio float32)``; ``ratio = v / row_scale`` before rounding."""
    v = x.float()
    if smooth is not None:
        v = v / smooth[None, :]
    if outlier_cols is not None:
        v = v.masked_fill(outlier_cols[None, :], 0.0)
    if scale is None:
        absmax = v.abs().amax(dim=1)
        row_scale = torch.where(absmax > 0, absmax / 127, torch.ones_like(absmax))
    else:
        row_scale = scale.float().expand(v.shape[0]).clone()
    ratio = v / row_scale[:, None]
    return torch.round(ratio).clamp(-127, 127).to(torch.int8), row_scale, ratio


def ref_matmul(q, row_scale, w, w_scale, bias):
    """float64 ``[M, N]``."""
    out = (q.double() @ w.double().t()) * row_scale.double()[:, None] * w_scale.double()[None, :]
    return out if bias is None else out + bias.double()[None, :]


def compare_quantize(got, ref) -> dict:
    q, s = got
    rq, rs, ratio = ref
    d = (q.int() - rq.int()).abs()
    # A code may differ by one only where v / row_scale is within 1e-6 relative of a .5 tie (float rounding
    # of the division could fall either side); exact ties must round half to even like torch.round.
    tie = torch.floor(ratio) + 0.5
    near_tie = ((ratio - tie).abs() <= 1e-6 * ratio.abs()) & (ratio != tie)
    return {
        "shape_ok": q.shape == rq.shape and q.dtype == torch.int8 and s.shape == rs.shape and s.dtype == torch.float32,
        "bad_codes": int(((d > 1) | ((d == 1) & ~near_tie)).sum()),
        "exact_ties": int(((ratio == tie) & (ratio.abs() < 127)).sum()),
        "scale_err": float(((s - rs).abs() / rs.abs()).max()) if rs.numel() else 0.0,
    }


def compare_matmul(y, ref, out_dtype) -> dict:
    """Worst ``|y - ref| / (eps(out_dtype) |ref| + 1e-5 max|ref|)``: below 1 passes (one rounding to the
    output dtype, plus float32 rounding relative to the output's magnitude)."""
    res = {"shape_ok": y.shape == ref.shape and y.dtype == out_dtype, "err": 0.0}
    if ref.numel():
        bound = torch.finfo(out_dtype).eps * ref.abs() + 1e-5 * ref.abs().max().clamp_min(1e-30)
        res["err"] = float(((y.double() - ref).abs() / bound).max())
    return res


# ---------------------------------------------------------------------------------------------- cases
# quantize_rows: m, k, x dtype, options (smooth, outliers, static scale, transposed view, zero row, ties)
Q_CASES = [
    (1, 200, "float32", {}),
    (3, 264, "bfloat16", {"zero_row": True}),
    (17, 200, "float16", {"smooth": True}),
    (64, 264, "float32", {"smooth": True, "outliers": True}),
    (17, 200, "bfloat16", {"outliers": True, "zero_row": True}),
    (17, 300, "float32", {"static": 0.01}),  # randn values beyond 1.27 clamp to +-127
    (3, 200, "bfloat16", {"static": 0.02, "zero_row": True, "smooth": True}),
    (17, 264, "float32", {"transposed": True}),
    (64, 200, "bfloat16", {"transposed": True, "outliers": True, "static": 0.015}),
    (3, 5, "float16", {}),
    (5, 40, "float32", {"ties": True}),
    (5, 40, "float32", {"ties": True, "static": 1.0}),
    (17, 200, "float32", {"static_rows": True}),  # a [M] scale tensor: one static scale per row
    (0, 64, "float32", {}),
]

# int8_matmul: m, k, n, out dtype, bias dtype (None: no bias), options (config override, views)
M_CASES = [
    (1, 200, 37, "float32", "float32", {}),
    (3, 264, 70, "bfloat16", "bfloat16", {}),
    (17, 520, 100, "float16", "float16", {}),
    (64, 200, 37, "float32", None, {}),
    (1, 264, 100, "bfloat16", None, {}),
    (3, 520, 37, "float16", "float32", {}),
    (17, 200, 70, "bfloat16", "float32", {}),
    (64, 264, 100, "float16", "bfloat16", {}),
    (64, 520, 70, "float32", "float16", {}),
    # a ragged group of row tiles (3 tiles, GROUP_M 2), and bigger tiles
    (40, 200, 70, "float32", "float32", {"config": {"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 32, "GROUP_M": 2}}),
    (17, 264, 100, "bfloat16", None, {"config": {"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 128, "GROUP_M": 8}}),
    # q and w as transposed views (strides other than row-major)
    (17, 200, 37, "float32", "float32", {"views": True}),
    (0, 64, 37, "float32", "float32", {}),
    (3, 64, 0, "bfloat16", None, {}),
]

# quantize_rows then int8_matmul, as a W8A8 layer runs them
E2E_CASES = [
    (17, 264, 70, "bfloat16", {"smooth": True}),
    (3, 200, 37, "float16", {"outliers": True, "smooth": True}),
]


def _dt(name):
    return getattr(torch, name)


def _q_id(case) -> str:
    m, k, dtype, opts = case
    return f"m{m}-k{k}-{dtype}" + "".join(f"-{a}{'' if b is True else b}" for a, b in sorted(opts.items()))


def _m_id(case) -> str:
    m, k, n, out, bias, opts = case
    extra = "-cfg" + "-".join(str(v) for v in opts["config"].values()) if "config" in opts else ""
    return f"m{m}-k{k}-n{n}-{out}-bias{bias}{extra}{'-views' if opts.get('views') else ''}"


def _e_id(case) -> str:
    m, k, n, dtype, opts = case
    return f"e2e-m{m}-k{k}-n{n}-{dtype}" + "".join(f"-{a}" for a in sorted(opts))


def make_quantize_inputs(m, k, dtype, opts, seed, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    if opts.get("ties"):
        # each row's absmax is 127, so row_scale is exactly 1 (or the static scale 1): v / row_scale lands on
        # .5 ties, which round to even; the static variant also clamps +-300
        x = (torch.randint(-300, 301, (m, k), generator=g) / 2).float()
        x[:, 0] = 127.0
        if opts.get("static") is None:
            x = x.clamp(-127, 127)
    else:
        x = torch.randn(m, k, generator=g) * (1 + 4 * torch.rand(k, generator=g))
    if opts.get("zero_row") and m > 1:
        x[1] = 0
    x = x.to(_dt(dtype))
    smooth = (0.25 + 2 * torch.rand(k, generator=g)) if opts.get("smooth") else None
    outliers = None
    if opts.get("outliers"):
        outliers = torch.rand(k, generator=g) < 0.1
        outliers[3] = True
        x[:, outliers] *= 50
        if opts.get("zero_row") and m > 1:
            x[1] = 0
            x[1, outliers] = 7.0  # nonzero only in outlier columns: quantizes as a row of zeros
    scale = torch.tensor(float(opts["static"])) if opts.get("static") is not None else None
    if opts.get("static_rows"):
        scale = 0.005 + 0.03 * torch.rand(m, generator=g)
    if opts.get("transposed"):
        x = x.t().contiguous().t()
        assert not x.is_contiguous()
    to = {"device": device}
    return (
        x.to(**to),
        None if smooth is None else smooth.to(**to),
        None if scale is None else scale.to(**to),
        None if outliers is None else outliers.to(**to),
    )


def make_matmul_inputs(m, k, n, bias_dtype, opts, seed, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    q = torch.randint(-127, 128, (m, k), generator=g, dtype=torch.int8)
    w = torch.randint(-127, 128, (n, k), generator=g, dtype=torch.int8)
    row_scale = 0.01 + 0.05 * torch.rand(m, generator=g)
    w_scale = 0.001 + 0.01 * torch.rand(n, generator=g)
    if m:
        row_scale[0] = 1.0
    bias = None if bias_dtype is None else (10 * torch.randn(n, generator=g)).to(_dt(bias_dtype))
    if opts.get("views"):
        q = q.t().contiguous().t()
        w = w.t().contiguous().t()
    return tuple(None if t is None else t.to(device) for t in (q, row_scale, w, w_scale, bias))


# ---------------------------------------------------------------------------------------------- worker
def _quantize_case(k8, i, case) -> dict:
    m, k, dtype, opts = case
    x, smooth, scale, outliers = make_quantize_inputs(m, k, dtype, opts, seed=i)
    return compare_quantize(k8.quantize_rows(x, smooth, scale, outliers), ref_quantize(x, smooth, scale, outliers))


def _matmul_case(k8, i, case) -> dict:
    m, k, n, out, bias_dtype, opts = case
    q, rs, w, ws, bias = make_matmul_inputs(m, k, n, bias_dtype, opts, seed=100 + i)
    y = k8._int8_matmul(q, rs, w, ws, bias, _dt(out), config=opts.get("config"))
    return compare_matmul(y, ref_matmul(q, rs, w, ws, bias), _dt(out))


def _e2e_case(k8, i, case) -> dict:
    m, k, n, dtype, opts = case
    x, smooth, _, outliers = make_quantize_inputs(m, k, dtype, opts, seed=200 + i)
    _, _, w, ws, bias = make_matmul_inputs(m, k, n, dtype, {}, seed=300 + i)
    qx, rs = k8.quantize_rows(x, smooth, None, outliers)
    rq, rrs, _ = ref_quantize(x, smooth, None, outliers)
    return compare_matmul(k8.int8_matmul(qx, rs, w, ws, bias, x.dtype), ref_matmul(rq, rrs, w, ws, bias), x.dtype)


def _worker() -> None:
    from hf_compress.kernels.triton import int8 as k8

    assert k8.interpreting()
    results = {}
    for cases, case_id, fn in (
        (Q_CASES, _q_id, _quantize_case),
        (M_CASES, _m_id, _matmul_case),
        (E2E_CASES, _e_id, _e2e_case),
    ):
        for i, case in enumerate(cases):
            try:
                results[case_id(case)] = fn(k8, i, case)
            except Exception as e:  # reported per case by the tests
                results[case_id(case)] = {"error": f"{type(e).__name__}: {e}"}
    print("RESULTS " + json.dumps(results))


@pytest.fixture(scope="module")
def interpreter_results():
    from conftest import interpreter_worker_results

    return interpreter_worker_results(__file__)


def _check_quantize(res: dict) -> None:
    assert "error" not in res, res.get("error")
    assert res["shape_ok"], res
    assert res["bad_codes"] == 0, res
    assert res["scale_err"] <= 1e-6, res


def _check_matmul(res: dict) -> None:
    assert "error" not in res, res.get("error")
    assert res["shape_ok"], res
    assert res["err"] < 1.0, res


@pytest.mark.parametrize("case", Q_CASES, ids=[_q_id(c) for c in Q_CASES])
def test_quantize_rows_interpreter(interpreter_results, case):
    res = interpreter_results[_q_id(case)]
    _check_quantize(res)
    if case[3].get("ties"):
        assert res["exact_ties"] > 10, res


@pytest.mark.parametrize("case", M_CASES, ids=[_m_id(c) for c in M_CASES])
def test_int8_matmul_interpreter(interpreter_results, case):
    _check_matmul(interpreter_results[_m_id(case)])


@pytest.mark.parametrize("case", E2E_CASES, ids=[_e_id(c) for c in E2E_CASES])
def test_quantize_then_matmul_interpreter(interpreter_results, case):
    _check_matmul(interpreter_results[_e_id(case)])


def test_reference_rounds_half_to_even():
    """The test's own reference: ties go to the even code, values beyond 127 * scale clamp."""
    x = torch.tensor([[127.0, 2.5, -3.5, 0.5, -0.5, 1.5]])
    q, s, _ = ref_quantize(x)
    assert s.tolist() == [1.0] and q.tolist() == [[127, 2, -4, 0, 0, 2]]
    q, _, _ = ref_quantize(torch.tensor([[300.0, -300.0, 126.5]]), scale=torch.tensor(1.0))
    assert q.tolist() == [[127, -127, 126]]


# ---------------------------------------------------------------------------------------------- validation
@pytest.fixture
def k8():
    pytest.importorskip("triton")
    from hf_compress.kernels.triton import int8

    return int8


def test_quantize_rows_rejects_bad_inputs(k8):
    x = torch.randn(3, 8)
    with pytest.raises(ValueError, match="2-D"):
        k8.quantize_rows(torch.randn(8))
    with pytest.raises(ValueError, match="float16, bfloat16 or float32"):
        k8.quantize_rows(x.to(torch.int8))
    with pytest.raises(ValueError, match="smooth"):
        k8.quantize_rows(x, smooth=torch.ones(7))
    with pytest.raises(ValueError, match="smooth must be float32"):
        k8.quantize_rows(x, smooth=torch.ones(8, dtype=torch.float16))
    with pytest.raises(ValueError, match="outlier_cols must be a bool"):
        k8.quantize_rows(x, outlier_cols=torch.zeros(8))
    with pytest.raises(ValueError, match="outlier_cols"):
        k8.quantize_rows(x, outlier_cols=torch.zeros(9, dtype=torch.bool))
    with pytest.raises(ValueError, match="scale must be float32"):
        k8.quantize_rows(x, scale=torch.tensor(1.0, dtype=torch.float64))
    with pytest.raises(ValueError, match="0-d"):
        k8.quantize_rows(x, scale=torch.ones(2))


def test_int8_matmul_rejects_bad_inputs(k8):
    q = torch.zeros(3, 8, dtype=torch.int8)
    w = torch.zeros(5, 8, dtype=torch.int8)
    rs, ws = torch.ones(3), torch.ones(5)
    with pytest.raises(ValueError, match="q must be int8"):
        k8.int8_matmul(q.float(), rs, w, ws, None, torch.float32)
    with pytest.raises(ValueError, match="w must be int8"):
        k8.int8_matmul(q, rs, w.half(), ws, None, torch.float32)
    with pytest.raises(ValueError, match="K=8 .* w has 5"):
        k8.int8_matmul(q, rs, w.t(), ws, None, torch.float32)
    with pytest.raises(ValueError, match="row_scale"):
        k8.int8_matmul(q, torch.ones(4), w, ws, None, torch.float32)
    with pytest.raises(ValueError, match="w_scale must be float32"):
        k8.int8_matmul(q, rs, w, ws.half(), None, torch.float32)
    with pytest.raises(ValueError, match="bias"):
        k8.int8_matmul(q, rs, w, ws, torch.ones(4), torch.float32)
    with pytest.raises(ValueError, match="out_dtype"):
        k8.int8_matmul(q, rs, w, ws, None, torch.int32)


def test_cpu_tensors_need_the_interpreter(k8):
    if k8.interpreting():
        pytest.skip("this session runs triton in its interpreter")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        k8.quantize_rows(torch.randn(3, 8))
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        k8.int8_matmul(
            torch.zeros(3, 8, dtype=torch.int8),
            torch.ones(3),
            torch.zeros(5, 8, dtype=torch.int8),
            torch.ones(5),
            None,
            torch.float32,
        )


# --------------------------------------------------------------------------------------------------- GPU
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("m", [1, 17, 512])
@pytest.mark.parametrize(
    "dtype,opts",
    [
        ("bfloat16", {}),
        ("float16", {"smooth": True, "outliers": True, "zero_row": True}),
        ("bfloat16", {"static": 0.02, "transposed": True}),
        ("float32", {"smooth": True}),
    ],
)
def test_quantize_rows_gpu(k8, m, dtype, opts):
    x, smooth, scale, outliers = make_quantize_inputs(m, 2048, dtype, opts, seed=m, device="cuda")
    res = compare_quantize(k8.quantize_rows(x, smooth, scale, outliers), ref_quantize(x, smooth, scale, outliers))
    _check_quantize(res)


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("m", [1, 3, 17, 64, 512])
@pytest.mark.parametrize("out,bias_dtype", [("bfloat16", "bfloat16"), ("float16", None), ("float32", "float32")])
@pytest.mark.parametrize("k,n", [(2048, 5632), (1000, 300)])
def test_int8_matmul_gpu(k8, m, out, bias_dtype, k, n):
    q, rs, w, ws, bias = make_matmul_inputs(m, k, n, bias_dtype, {}, seed=m, device="cuda")
    _check_matmul(
        compare_matmul(k8.int8_matmul(q, rs, w, ws, bias, _dt(out)), ref_matmul(q, rs, w, ws, bias), _dt(out))
    )


@pytest.mark.gpu
@needs_cuda
def test_int8_matmul_gpu_fixed_configs_and_views(k8):
    q, rs, w, ws, bias = make_matmul_inputs(130, 2048 + 40, 1000, "float16", {"views": True}, seed=1, device="cuda")
    ref = ref_matmul(q, rs, w, ws, bias)
    for cfg in k8._mm_configs():
        config = dict(cfg.kwargs, num_warps=cfg.num_warps, num_stages=cfg.num_stages)
        _check_matmul(
            compare_matmul(k8._int8_matmul(q, rs, w, ws, bias, torch.bfloat16, config=config), ref, torch.bfloat16)
        )


if __name__ == "__main__" and "--worker" in sys.argv:
    sys.path.insert(0, str(ROOT))
    _worker()
