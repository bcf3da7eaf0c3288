"""The Triton GPTQ kernel against the reference.

Without a GPU the kernel runs in Triton's CPU interpreter. The interpreter must be switched on
(``TRITON_INTERPRET=1``) before triton is first imported, and switching it on in this process would also
turn every other triton kernel of the session (e.g. inductor's) into interpreted code, so the interpreter
cases run in one subprocess (this file with ``--worker``) and each test checks one of its results.
Tests marked ``gpu`` run the compiled kernel on CUDA.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent

# bits, group_size, k, n, act_order, m, dtype, config overrides
CASES = []
for _bits in (2, 3, 4, 8):
    for _g, _k, _n, _act in [(-1, 100, 37, False), (32, 96, 40, True), (32, 100, 48, False), (24, 70, 33, False)]:
        for _m in (1, 5):
            CASES.append((_bits, _g, _k, _n, _act, _m, "float32", {}))
CASES += [
    (3, 32, 100, 37, True, 1, "bfloat16", {}),
    (3, 32, 100, 37, True, 5, "bfloat16", {}),
    (4, 24, 70, 33, False, 5, "float16", {}),
    (8, -1, 100, 37, False, 1, "float16", {}),
    (2, 32, 96, 40, True, 5, "bfloat16", {}),
    # split-K GEMV (fp32 partial sums reduced outside) with K not a multiple of BLOCK_K
    (3, 32, 100, 37, True, 1, "float32", {"BLOCK_K": 32, "SPLIT_K": 4}),
    (4, 24, 70, 33, False, 3, "bfloat16", {"BLOCK_K": 16, "SPLIT_K": 3}),
    # dot path forced for a single row, several M tiles
    (3, -1, 100, 37, False, 1, "float32", {"USE_DOT": True, "BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 16}),
    (4, 32, 64, 48, True, 40, "float32", {}),
    (8, 32, 64, 48, False, 7, "float32", {"no_bias": True}),
    (4, 32, 64, 48, False, 6, "float32", {"shape3d": True}),
]


def _case_id(case) -> str:
    bits, g, k, n, act, m, dtype, cfg = case
    extra = "-".join(f"{a}{b}" for a, b in sorted(cfg.items()))
    return f"b{bits}-g{g}-k{k}-n{n}{'-act' if act else ''}-m{m}-{dtype}{'-' + extra if extra else ''}"


def _tolerance(dtype: str) -> float:
    return 1e-5 if dtype == "float32" else 1.2e-2


def _worker() -> None:
    sys.path.insert(0, str(HERE))
    sys.path.insert(0, str(ROOT))
    from test_kernels import make_layer

    from hf_compress.kernels.triton import triton_linear

    results = {}
    for case in CASES:
        bits, g, k, n, act, m, dtype, cfg = case
        cfg = dict(cfg)
        no_bias, shape3d = cfg.pop("no_bias", False), cfg.pop("shape3d", False)
        layer = make_layer(k, n, bits, g, act_order=act, bias=not no_bias, seed=len(results))
        torch.manual_seed(len(results))
        x = torch.randn(*((2, m // 2) if shape3d else (m,)), k).to(getattr(torch, dtype))
        ref = layer.ref(x)
        try:
            y = triton_linear(x, layer.qweight, layer.qzeros, layer.scales, layer.g_idx, layer.bias, bits, k, **cfg)
            ok_shape = y.shape == ref.shape and y.dtype == ref.dtype
            err = ((y.float() - ref.float()).abs().max() / ref.float().abs().max().clamp_min(1e-6)).item()
            results[_case_id(case)] = {"err": err, "shape_ok": ok_shape}
        except Exception as e:  # reported per case by the tests
            results[_case_id(case)] = {"error": f"{type(e).__name__}: {e}"}
    print("RESULTS " + json.dumps(results))


@pytest.fixture(scope="module")
def interpreter_results():
    from conftest import interpreter_worker_results

    return interpreter_worker_results(__file__)


@pytest.mark.parametrize("case", CASES, ids=[_case_id(c) for c in CASES])
def test_triton_interpreter_matches_reference(interpreter_results, case):
    res = interpreter_results[_case_id(case)]
    assert "error" not in res, res.get("error")
    assert res["shape_ok"]
    assert res["err"] < _tolerance(case[6]), res


def test_triton_backend_not_used_on_cpu():
    from hf_compress.kernels import backend_for, unsupported_reason

    sys.path.insert(0, str(HERE))
    from test_kernels import make_layer

    layer = make_layer(64, 32, 3, 32)
    assert backend_for(layer) != "triton"
    assert "CUDA" in unsupported_reason(layer, "triton")


def test_works_without_triton():
    """triton is optional: with it absent ``import hf_compress`` and the CPU kernels still work."""
    code = (
        "import sys; sys.modules['triton'] = None\n"  # makes `import triton` fail, find_spec return None
        "import torch, hf_compress\n"
        "from hf_compress import kernels\n"
        "sys.path.insert(0, sys.argv[1])\n"
        "from test_kernels import make_layer\n"
        "layer = make_layer(64, 32, 4, 32)\n"
        "x = torch.randn(2, 64)\n"
        "assert not kernels.triton_available()\n"
        "assert kernels.backend_for(layer) == 'cpu-int4'\n"
        "print(float((layer(x) - layer.ref(x)).abs().max()))\n"
    )
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p)
    out = subprocess.run([sys.executable, "-c", code, str(HERE)], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert float(out.stdout.strip().splitlines()[-1]) < 0.05


# --------------------------------------------------------------------------------------------------- GPU
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("group_size,act_order", [(-1, False), (128, False), (128, True), (100, False)])
@pytest.mark.parametrize("m", [1, 3, 17, 130])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_triton_gpu_matches_reference(bits, group_size, act_order, m, dtype):
    sys.path.insert(0, str(HERE))
    from test_kernels import make_layer

    from hf_compress.kernels import backend_for

    layer = make_layer(704, 300, bits, group_size, act_order=act_order, dtype=dtype).cuda()
    x = torch.randn(m, 704, device="cuda", dtype=dtype)
    assert backend_for(layer, x) == "triton"
    y = layer(x)
    ref = layer.ref(x.float() if dtype == torch.float32 else x)
    err = ((y.float() - ref.float()).abs().max() / ref.float().abs().max()).item()
    assert err < (2e-3 if dtype == torch.float32 else 1.2e-2)


@pytest.mark.gpu
@needs_cuda
def test_triton_gpu_autograd_and_compile():
    sys.path.insert(0, str(HERE))
    from test_kernels import make_layer

    layer = make_layer(256, 96, 4, 64, act_order=True).cuda()
    x = torch.randn(3, 256, device="cuda", requires_grad=True)
    layer(x).sum().backward()
    torch.testing.assert_close(x.grad, torch.ones(3, 96, device="cuda") @ layer.weight(), rtol=1e-4, atol=1e-4)
    compiled = torch.compile(layer)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), layer(x))


if __name__ == "__main__" and "--worker" in sys.argv:
    _worker()
