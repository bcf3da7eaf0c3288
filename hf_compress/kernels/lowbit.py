"""Backend choice and forward for the packed 1.58-bit / 1-bit layers (``PackedBitLinear``).

==============  =================================================================================
backend         applies to
==============  =================================================================================
``cpu-lowbit``  CPU, float32/bfloat16 activations, when the C++ kernel builds
                (:mod:`hf_compress.kernels.cpu.lowbit`: reads the 2-bit / 1-bit codes directly,
                AVX512-VNNI, AVX2 or scalar, activation quantization fused)
``triton``      CUDA, fp16/bf16/fp32 activations, when triton imports
``reference``   everything (:func:`hf_compress.quant.lowbit.lowbit_linear_reference`)
==============  =================================================================================

Every backend computes the same integer sums, so results agree to float rounding. The backward is the
straight-through estimate ``grad_x = grad_out @ W`` (the dequantized weight, OneBit's ``in_scale`` folded in),
so adapters can train on a packed base; the packed state is frozen.
"""

from __future__ import annotations

import torch

from ..quant.lowbit import lowbit_linear_reference
from .ste import with_dequantized_backward
from .triton import is_available as triton_available

LOWBIT_BACKENDS = ("reference", "cpu-lowbit", "triton")
_AUTO_ORDER = {"cpu": ("cpu-lowbit",), "cuda": ("triton",)}


def _forced() -> str | None:
    from . import _forced as forced  # set by hf_compress.kernels.use_backend

    return forced


def _cpu_available() -> bool:
    try:
        from .cpu.lowbit import available
    except ImportError:
        return False
    return available()


def unsupported_reason(name: str, device_type: str, dtype: torch.dtype) -> str | None:
    """Why backend ``name`` cannot run a packed low-bit layer (``None`` when it can)."""
    if name == "reference":
        return None
    if name not in LOWBIT_BACKENDS:
        return f"{name} does not run 1.58-bit / 1-bit layers; they run on {list(LOWBIT_BACKENDS)}"
    if name == "cpu-lowbit":
        if device_type != "cpu":
            return f"cpu-lowbit runs on CPU tensors, got {device_type}"
        if dtype not in (torch.float32, torch.bfloat16):
            return f"cpu-lowbit takes float32/bfloat16 activations, got {dtype}"
        if not _cpu_available():
            return "the C++ low-bit kernel did not build here (a C++ compiler is needed at first use; see the log)"
        return None
    if device_type != "cuda":
        return f"triton runs on CUDA tensors, got {device_type}"
    if not triton_available():
        return "triton is not installed (or failed to import)"
    return None


def backend_for(layer, x: torch.Tensor | None = None) -> str:
    """The backend :func:`lowbit_linear` uses for ``layer`` with activations like ``x``."""
    device = x.device if x is not None else layer.qweight.device
    dtype = x.dtype if x is not None else layer.compute_dtype
    forced = _forced()
    if forced is not None:
        why = unsupported_reason(forced, device.type, dtype)
        if why is not None:
            raise ValueError(f"kernel backend {forced!r} cannot run this layer: {why}")
        return forced
    return next((n for n in _AUTO_ORDER.get(device.type, ()) if unsupported_reason(n, device.type, dtype) is None), "reference")


def _backend(layer, x: torch.Tensor) -> str:
    """:func:`backend_for`, remembered per layer for (forced backend, device, dtype): it runs once per layer and
    token in decode, where its checks would cost as much as a small layer's kernel."""
    key = (_forced(), x.device.type, x.dtype)
    cache = layer.__dict__.setdefault("_lowbit_backend", {})
    name = cache.get(key)
    if name is None:
        name = cache[key] = backend_for(layer, x)
    return name


def _forward(x: torch.Tensor, layer, bias) -> torch.Tensor:
    name = _backend(layer, x)
    args = (layer.qweight, layer.weight_scale, layer._buffers.get("in_scale"), bias, layer.storage_bits, layer.in_features)
    if name == "cpu-lowbit":  # the op takes any leading dimensions
        return torch.ops.hf_compress_lowbit.linear(x, *args, -1)
    x2 = x.reshape(-1, x.shape[-1])
    if name == "triton":
        from .triton.lowbit import lowbit_linear_triton

        out = lowbit_linear_triton(x2, *args)
    else:
        out = lowbit_linear_reference(x2, *args)
    return out.reshape(*x.shape[:-1], layer.out_features)


def lowbit_linear(x: torch.Tensor, layer, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``layer``'s packed product for ``x [..., in_features]`` (``+ bias``), on the best backend available."""
    return with_dequantized_backward(_forward, x, layer, bias)
