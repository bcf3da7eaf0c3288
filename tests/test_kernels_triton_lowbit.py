"""The Triton packed ternary / binary kernels (``hf_compress.kernels.triton.lowbit``) against
``lowbit_linear_reference``.

As in ``test_kernels_triton.py``: without a GPU the kernels run in Triton's CPU interpreter, which must be
switched on (``TRITON_INTERPRET=1``) before triton is first imported and would turn every other triton
kernel of the session into interpreted code, so the interpreter cases run in one subprocess (this file
with ``--worker``) and each test checks one of its results. Tests marked ``gpu`` run the compiled kernels;
without a GPU, one test compiles them for sm_90 (triton's ptxas) with the GPU's default block sizes.

The integer sums are exact in both, so the outputs differ only by float32 rounding of the epilogue:
within ``1e-6`` of ``|acc * s * w_scale| + |bias|`` per element, and for bfloat16 / float16 outputs by at
most one rounding step of the output dtype (bitwise equal nearly everywhere).
"""

from __future__ import annotations

import itertools
import json
import sys
from pathlib import Path

import pytest
import torch

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent

# ---------------------------------------------------------------------------------------------- cases
# (bits, m, k, n, x dtype, options). The option flags cycle through all 8 combinations of per-channel
# w_scale, in_scale and bias along the shape grid, so that each variant (GEMV for m <= 4, GEMM above) meets
# each combination for both bit widths (across the two dtypes).
_FLAGS = list(itertools.product((False, True), repeat=3))
CASES = []
for _i, (_bits, _dtype, _m, _k, _n) in enumerate(
    itertools.product((2, 1), ("float32", "bfloat16"), (1, 3, 17), (64, 300, 512), (5, 64))
):
    _pc, _ins, _b = _FLAGS[_i % 8]
    CASES.append((_bits, _m, _k, _n, _dtype, {"per_channel": _pc, "in_scale": _ins, "bias": _b}))

_ALL = {"per_channel": True, "in_scale": True, "bias": True}
CASES += [
    # no split-K (epilogue fused in the main kernel) for both variants, and a split count that is no power
    # of two (whole BLOCK_KB steps per split, the last split shorter)
    (2, 3, 512, 64, "float32", {**_ALL, "config": {"SPLIT_K": 1}}),
    (1, 17, 512, 5, "float32", {**_ALL, "config": {"SPLIT_K": 1}}),
    (2, 17, 1000, 37, "float32", {**_ALL, "config": {"SPLIT_K": 3}}),
    (1, 1, 1000, 37, "bfloat16", {"bias": True, "config": {"SPLIT_K": 3, "BLOCK_KB": 16}}),
    # each variant forced on the other's shapes
    (2, 1, 300, 64, "float32", {**_ALL, "config": {"USE_DOT": True, "BLOCK_M": 16, "BLOCK_N": 16}}),
    (1, 17, 300, 64, "bfloat16", {**_ALL, "config": {"USE_DOT": False, "BLOCK_M": 8, "BLOCK_N": 16}}),
    # the GPU's default steps (and larger): byte tiles spanning several 64-byte blocks
    (2, 17, 1000, 70, "float32", {**_ALL, "config": {"BLOCK_M": 16, "BLOCK_N": 64, "BLOCK_KB": 64}}),
    (1, 17, 1500, 70, "float32", {**_ALL, "config": {"BLOCK_M": 32, "BLOCK_N": 64, "BLOCK_KB": 128}}),
    (2, 2, 1000, 70, "bfloat16", {**_ALL, "config": {"BLOCK_N": 32, "BLOCK_KB": 256, "SPLIT_K": 1}}),
    (1, 4, 1500, 70, "float32", {"bias": True, "config": {"BLOCK_N": 32, "BLOCK_KB": 64}}),
    (2, 17, 1000, 70, "bfloat16", {**_ALL, "config": {"BLOCK_M": 64, "BLOCK_N": 128, "BLOCK_KB": 32}}),
    # float16, 3-D inputs, strided (transposed) x, a row of zeros, a bias in another dtype, an [N]-shaped
    # per-tensor scale given as a 0-d tensor
    (2, 17, 300, 64, "float16", {**_ALL, "zero_row": True}),
    (1, 3, 300, 64, "float16", {"bias": True, "zero_row": True}),
    (2, 6, 300, 37, "bfloat16", {**_ALL, "shape3d": True}),
    (1, 17, 300, 37, "float32", {**_ALL, "transposed": True}),
    (2, 1, 300, 37, "bfloat16", {"bias": True, "bias_dtype": "float32", "scalar_scale": True}),
    # nothing to compute
    (2, 0, 300, 37, "float32", {**_ALL}),
]


def _case_id(case) -> str:
    bits, m, k, n, dtype, opts = case
    name = f"{'ternary' if bits == 2 else 'binary'}-m{m}-k{k}-n{n}-{dtype}"
    flags = [f for f in ("per_channel", "in_scale", "bias", "zero_row", "shape3d", "transposed") if opts.get(f)]
    flags += [f"{a}{b}" for a, b in sorted(opts.get("config", {}).items())]
    return name + "".join("-" + f for f in flags)


def _dt(name: str) -> torch.dtype:
    return getattr(torch, name)


def make_inputs(case, seed: int, device: str = "cpu") -> dict:
    """The layer (random codes, packed) and its input, on ``device``."""
    from hf_compress.quant.lowbit import pack_binary, pack_ternary

    bits, m, k, n, dtype, opts = case
    g = torch.Generator().manual_seed(seed)
    if bits == 2:
        qweight = pack_ternary(torch.randint(-1, 2, (n, k), generator=g, dtype=torch.int8))
    else:
        qweight = pack_binary(torch.randint(0, 2, (n, k), generator=g, dtype=torch.int8) * 2 - 1)
    if opts.get("per_channel"):
        w_scale = 0.01 + 0.1 * torch.rand(n, generator=g)
    elif opts.get("scalar_scale"):
        w_scale = torch.tensor(0.037)
    else:
        w_scale = torch.tensor([0.037])
    in_scale = (0.25 + 2 * torch.rand(k, generator=g)) if opts.get("in_scale") else None
    bias = (torch.randn(n, generator=g)).to(_dt(opts.get("bias_dtype", dtype))) if opts.get("bias") else None
    x = torch.randn(m, k, generator=g) * (1 + 4 * torch.rand(k, generator=g))
    if opts.get("zero_row") and m > 1:
        x[1] = 0
    x = x.to(_dt(dtype))
    if opts.get("shape3d"):
        x = x.reshape(2, m // 2, k)
    if opts.get("transposed"):
        x = x.t().contiguous().t()
        assert not x.is_contiguous()
    layer = {"qweight": qweight, "w_scale": w_scale, "in_scale": in_scale, "bias": bias, "bits": bits, "in_features": k}
    return {"x": x.to(device), **{a: b.to(device) if torch.is_tensor(b) else b for a, b in layer.items()}}


def run_case(case, seed: int, device: str = "cpu") -> dict:
    """Kernel against reference: ``err`` (worst ``|y - ref|`` over ``1e-6 (|acc s w_scale| + |bias|)`` plus,
    for 16-bit outputs, one step of the output dtype; below 1 passes) and, for 16-bit outputs,
    ``mismatches`` (elements not bitwise equal)."""
    from hf_compress.kernels.triton.lowbit import lowbit_linear_triton
    from hf_compress.quant.lowbit import lowbit_linear_reference

    inp = make_inputs(case, seed, device)
    args = [inp[a] for a in ("x", "qweight", "w_scale", "in_scale", "bias", "bits", "in_features")]
    y = lowbit_linear_triton(*args, **case[5].get("config", {}))
    ref = lowbit_linear_reference(*args)
    res = {"shape_ok": y.shape == ref.shape and y.dtype == ref.dtype and y.device == ref.device, "err": 0.0}
    if ref.numel():
        no_bias = lowbit_linear_reference(*args[:4], None, *args[5:]).float()
        magnitude = no_bias.abs() + (inp["bias"].float().abs() if inp["bias"] is not None else 0.0)
        bound = 1e-6 * magnitude + 1e-30
        if ref.dtype != torch.float32:
            bound = bound + torch.finfo(ref.dtype).eps * ref.float().abs()
        res["err"] = float(((y.double() - ref.double()).abs() / bound.double()).max())
        if ref.dtype != torch.float32:
            res["mismatches"] = int((y != ref).sum())
            res["numel"] = ref.numel()
    return res


# ---------------------------------------------------------------------------------------------- worker
def _worker() -> None:
    from hf_compress.kernels.triton.gptq import interpreting

    assert interpreting()
    results = {}
    for i, case in enumerate(CASES):
        try:
            results[_case_id(case)] = run_case(case, seed=i)
        except Exception as e:  # reported per case by the tests
            results[_case_id(case)] = {"error": f"{type(e).__name__}: {e}"}
    print("RESULTS " + json.dumps(results))


@pytest.fixture(scope="module")
def interpreter_results():
    from conftest import interpreter_worker_results

    return interpreter_worker_results(__file__)


def _check(res: dict) -> None:
    assert "error" not in res, res.get("error")
    assert res["shape_ok"], res
    assert res["err"] < 1.0, res
    if res.get("numel"):
        # the float32 epilogues of the kernel and the reference differ by a few ulp: a 16-bit output may
        # round the other way only where that difference straddles a rounding boundary, i.e. almost never
        assert res["mismatches"] <= max(1, res["numel"] // 100), res


@pytest.mark.parametrize("case", CASES, ids=[_case_id(c) for c in CASES])
def test_lowbit_interpreter_matches_reference(interpreter_results, case):
    _check(interpreter_results[_case_id(case)])


def test_cases_cover_both_variants_and_all_options():
    from itertools import product

    seen = set()
    for bits, m, _, _, _, opts in CASES:
        if "config" not in opts:
            seen.add(
                (bits, m <= 4, opts.get("per_channel", False), opts.get("in_scale", False), opts.get("bias", False))
            )
    assert seen >= set(product((1, 2), (True, False), *[(False, True)] * 3))


# ---------------------------------------------------------------------------------------------- validation
@pytest.fixture
def kl():
    pytest.importorskip("triton")
    from hf_compress.kernels.triton import lowbit

    return lowbit


def test_pick_config(kl):
    cpu = torch.device("cpu")
    for bits in (2, 1):
        gemv = kl.pick_config(1, 4096, 1024, bits, cpu)
        gemm = kl.pick_config(kl.GEMV_MAX_M + 1, 4096, 1024, bits, cpu)
        assert not gemv["USE_DOT"] and gemm["USE_DOT"]
        for cfg in (gemv, gemm):
            assert cfg["SPLIT_K"] >= 1
            for key in ("BLOCK_M", "BLOCK_N", "BLOCK_KB"):
                assert cfg[key] & (cfg[key] - 1) == 0
        assert min(gemm["BLOCK_M"], gemm["BLOCK_N"]) >= 16 and gemm["BLOCK_KB"] >= 32


# (bits, m, split-K partial sums): a few of the GPU's default configs, both variants and both epilogues
AOT_CASES = [(2, 1, True), (1, 4, False), (2, 17, False), (1, 512, True)]


def test_default_configs_compile_for_sm90(kl, monkeypatch):
    """Without a GPU, compile the kernels with the GPU's default configs to a cubin for sm_90 (triton's own
    ptxas): catches what the interpreter does not check (e.g. the smallest int8 ``tl.dot``)."""
    if kl.interpreting():
        pytest.skip("this session runs triton in its interpreter")
    try:
        from triton.backends.compiler import GPUTarget
        from triton.compiler import ASTSource, compile
    except ImportError as e:
        pytest.skip(f"this triton has no ahead-of-time compile API: {e}")
    target = GPUTarget("cuda", 90, 32)
    monkeypatch.setattr(kl, "_sm_count", lambda device: 132)  # an H100's; CPU devices report 4

    def build(fn, sig, const, **options):
        names = fn.arg_names
        sig = {a: "constexpr" if a in const else sig.get(a, "i32") for a in names}
        # what triton's launcher would specialize: unit strides, 16-divisible pointers and sizes
        attrs = {(names.index(a),): [["tt.divisibility", 16]] for a in names if sig[a] != "constexpr"}
        try:
            return compile(ASTSource(fn, sig, const, attrs), target=target, options=options)
        except RuntimeError as e:
            if "ptxas" in str(e) and "not found" in str(e).lower():
                pytest.skip(f"no ptxas: {e}")
            raise

    ptrs = {"q_ptr": "*i8", "rs_ptr": "*fp32", "w_ptr": "*u8", "ws_ptr": "*fp32", "bias_ptr": "*bf16"}
    for bits, m, partial in AOT_CASES:
        cfg = kl.pick_config(m, 4096, 1024, bits, torch.device("cpu"))
        const = {a: cfg[a] for a in ("BLOCK_M", "BLOCK_N", "BLOCK_KB", "USE_DOT")}
        const.update(BITS=bits, PARTIAL=partial, HAS_BIAS=True, stride_qk=1, stride_wk=1, stride_on=1)
        sig = dict(ptrs, out_ptr="*i32" if partial else "*bf16")
        k = build(kl._lowbit_matmul, sig, const, num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
        assert k.asm["cubin"]
        if cfg["USE_DOT"]:
            assert ".s8.s8" in k.asm["ptx"], "the GEMM must use int8 tensor-core instructions"
    sig = {"part_ptr": "*i32", "rs_ptr": "*fp32", "ws_ptr": "*fp32", "bias_ptr": "*fp16", "out_ptr": "*fp16"}
    const = {"HAS_BIAS": True, "BLOCK_M": 16, "BLOCK_N": 128, "stride_pn": 1, "stride_on": 1}
    assert build(kl._splitk_epilogue, sig, const, num_warps=4).asm["cubin"]


def test_lowbit_rejects_bad_inputs(kl):
    from hf_compress.quant.lowbit import pack_ternary

    k, n = 300, 5
    qw = pack_ternary(torch.zeros(n, k, dtype=torch.int8))
    x, ws = torch.randn(3, k), torch.ones(1)
    f = kl.lowbit_linear_triton
    with pytest.raises(ValueError, match="bits 1 .* or 2"):
        f(x, qw, ws, None, None, 4, k)
    with pytest.raises(ValueError, match="float16, bfloat16 or float32"):
        f(x.double(), qw, ws, None, None, 2, k)
    with pytest.raises(ValueError, match="expects 300"):
        f(torch.randn(3, 299), qw, ws, None, None, 2, k)
    with pytest.raises(ValueError, match="qweight must be uint8"):
        f(x, qw[:, :64], ws, None, None, 2, k)
    with pytest.raises(ValueError, match="qweight must be uint8"):
        f(x, qw, ws, None, None, 1, k)  # a ternary width read as binary
    with pytest.raises(ValueError, match="w_scale"):
        f(x, qw, torch.ones(3), None, None, 2, k)
    with pytest.raises(ValueError, match="in_scale"):
        f(x, qw, ws, torch.ones(k + 1), None, 2, k)
    with pytest.raises(ValueError, match="bias"):
        f(x, qw, ws, None, torch.ones(n + 1), 2, k)
    with pytest.raises(ValueError, match="unknown config"):
        f(x, qw, ws, None, None, 2, k, BLOCK_Q=4)
    with pytest.raises(ValueError, match="power of two"):
        f(x, qw, ws, None, None, 2, k, BLOCK_KB=48)
    with pytest.raises(ValueError, match=">= 16"):
        f(x, qw, ws, None, None, 2, k, USE_DOT=True, BLOCK_M=4)
    with pytest.raises(ValueError, match="BLOCK_KB >= 32"):
        f(x, qw, ws, None, None, 2, k, USE_DOT=True, BLOCK_M=16, BLOCK_KB=16)


def test_cpu_tensors_need_the_interpreter(kl):
    from hf_compress.quant.lowbit import pack_binary

    if kl.interpreting():
        pytest.skip("this session runs triton in its interpreter")
    qw = pack_binary(torch.ones(5, 64, dtype=torch.int8))
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        kl.lowbit_linear_triton(torch.randn(3, 64), qw, torch.ones(1), None, None, 1, 64)


# --------------------------------------------------------------------------------------------------- GPU
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

# the interpreter's cases plus layer-sized shapes run with the GPU's default block sizes
GPU_CASES = CASES + [
    (bits, m, k, n, dtype, {**_ALL, "per_channel": pc})
    for bits in (2, 1)
    for m in (1, 4, 17, 130)
    for k, n in ((4096, 1000), (2000, 5632))
    for dtype, pc in (("bfloat16", False), ("float32", True))
]


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("case", GPU_CASES, ids=[_case_id(c) for c in GPU_CASES])
def test_lowbit_gpu_matches_reference(case):
    _check(run_case(case, seed=len(case[5]) + case[1], device="cuda"))


if __name__ == "__main__" and "--worker" in sys.argv:
    sys.path.insert(0, str(ROOT))
    _worker()
