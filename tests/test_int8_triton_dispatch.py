"""The ``triton`` branch of the int8 layer dispatch (``hf_compress.kernels.int8``) against ``forward_reference``.

The kernels themselves are tested in ``test_kernels_triton_int8.py``; this checks the glue around them
(LLM.int8's outlier mask and float part, per-tensor scales, static scales, SmoothQuant divisors, bias, output
dtype) for every layer variant. Without a GPU it runs in Triton's interpreter, in a subprocess (the
interpreter must be switched on before triton is imported), with the device check relaxed to CPU tensors.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]

VARIANTS = {
    "llm.int8": ("Int8MixedLinear", {"threshold": 3.0}),
    "w8a8 per-token": ("W8A8Linear", {}),
    "w8a8 per-tensor": ("W8A8Linear", {"act_granularity": "per-tensor"}),
    "w8a8 static": ("W8A8Linear", {"act_granularity": "per-tensor", "static": True}),
    "w8a8 static smooth": ("W8A8Linear", {"act_granularity": "per-tensor", "static": True, "smooth": True}),
    "w8a8 smooth": ("W8A8Linear", {"smooth": True}),
}


def run_cases() -> dict:
    import hf_compress
    from hf_compress import kernels
    from hf_compress.kernels import int8 as dispatch

    relaxed = dispatch.unsupported_reason

    def allow_cpu(name, device_type, dtype):
        return relaxed(name, "cuda" if name == "triton" else device_type, dtype)

    dispatch.unsupported_reason = allow_cpu
    results = {}
    for label, (cls_name, kw) in VARIANTS.items():
        torch.manual_seed(0)
        lin = torch.nn.Linear(72, 40)
        layer = getattr(hf_compress, cls_name)(72, 40, **kw)
        smooth = torch.rand(72) + 0.5
        if "smooth" in layer._buffers:
            layer.smooth.copy_(smooth)
        if "input_scale" in layer._buffers:
            layer.input_scale.fill_(0.02)
        w = lin.weight.detach() * (smooth if "smooth" in layer._buffers else 1.0)
        layer.load_float_weight(w, lin.bias)
        for dtype in (torch.float32, torch.bfloat16):
            x = torch.randn(2, 5, 72)
            x[..., 3] *= 8.0  # an outlier feature
            x = x.to(dtype)
            with kernels.use_backend("triton"):
                got = layer(x)
                backend = dispatch.backend_for(layer, x)
            ref = layer.forward_reference(x)
            scale = ref.float().abs().max().item()
            results[f"{label} {dtype}"] = {
                "backend": backend,
                "dtype_ok": got.dtype == dtype and got.shape == ref.shape,
                "err": (got.float() - ref.float()).abs().max().item() / scale,
            }
    return results


@pytest.fixture(scope="module")
def interpreted():
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    proc = subprocess.run(
        [sys.executable, __file__, "--worker"], env=env, capture_output=True, text=True, timeout=600, cwd=ROOT
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("label", VARIANTS)
@pytest.mark.parametrize("dtype", ["torch.float32", "torch.bfloat16"])
def test_triton_dispatch_matches_reference(interpreted, label, dtype):
    r = interpreted[f"{label} {dtype}"]
    assert r["backend"] == "triton"
    assert r["dtype_ok"]
    # fp32: the kernels divide by the smoothing factor where the reference multiplies by its inverse, so a
    # code may differ by one at a rounding tie; bf16: one rounding of the output.
    assert r["err"] < (1e-2 if dtype == "torch.bfloat16" else 2e-3), r


if __name__ == "__main__" and "--worker" in sys.argv:
    print(json.dumps(run_cases()))
