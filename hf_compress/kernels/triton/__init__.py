"""Fused dequantize-GEMM Triton kernel for the packed GPTQ layout (imported lazily: triton is optional).

``quant_linear`` uses it for CUDA activations when triton imports. With ``TRITON_INTERPRET=1`` set before
triton is first imported, :func:`triton_linear` also runs CPU tensors in Triton's interpreter, which is how
the tests check it without a GPU (in a subprocess, so the rest of the test session keeps compiled triton).
"""

from __future__ import annotations

import functools
import importlib.util


@functools.cache
def is_available() -> bool:
    if importlib.util.find_spec("triton") is None:
        return False
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401
    except Exception:  # a broken install must not break the CPU paths
        return False
    return True


def triton_linear(x, qweight, qzeros, scales, g_idx, bias, bits: int, in_features: int, **config):
    from .gptq import triton_linear as _impl

    return _impl(x, qweight, qzeros, scales, g_idx, bias, bits, in_features, **config)
