"""Kernels for the packed GPTQ layout: the reference, CPU int8/int4 fast paths and a Triton GPU kernel.

The quantized layer calls :func:`quant_linear`; it picks a backend from the activation's device and dtype
and the layer's bits and grouping, prepares the backend's tensors once into ``layer._kernel_cache`` and
runs the matching ``hf_compress::*`` custom op (see :mod:`hf_compress.kernels.ops`).

==============  =================================================================================
backend         applies to
==============  =================================================================================
``cpu-int8``    CPU, fp32/bf16 activations, bits 8 with one scale per output row (group_size -1)
``cpu-int4``    CPU, fp32/bf16 activations, bits 2/3/4 whose groups (sorted, for act-order g_idx)
                are whole multiples of 32 columns (any K, any N: both are padded)
``triton``      CUDA, fp16/bf16/fp32 activations, any bits/grouping/g_idx, when triton imports
``reference``   everything else (dequantize + ``F.linear`` in ``x.dtype``, nothing cached)
==============  =================================================================================

The CPU fast paths compute in bf16 (fp32 activations are cast; the result is cast back), so they match
the reference to bf16 precision, not bit for bit. ``use_backend("reference")`` is exact.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch

from . import cpu as _cpu
from . import ops
from .triton import is_available as triton_available
from .unpack import dequantize

__all__ = [
    "BACKENDS",
    "int8_linear",
    "lowbit_linear",
    "backend_for",
    "dequantize",
    "quant_linear",
    "reference_linear",
    "unsupported_reason",
    "use_backend",
    "triton_available",
]

_forced: str | None = None  # read by .int8 too

from .int8 import INT8_BACKENDS, int8_linear  # noqa: E402
from .lowbit import LOWBIT_BACKENDS, lowbit_linear  # noqa: E402

WEIGHT_ONLY_BACKENDS = ("reference", "cpu-int8", "cpu-int4", "triton")
BACKENDS = tuple(dict.fromkeys(WEIGHT_ONLY_BACKENDS + INT8_BACKENDS + LOWBIT_BACKENDS))
_AUTO_ORDER = {"cpu": ("cpu-int8", "cpu-int4"), "cuda": ("triton",)}


def reference_linear(x, qweight, qzeros, scales, g_idx, bias, bits: int, in_features: int) -> torch.Tensor:
    """``F.linear(x, dequantize_layout(...), bias)`` computed in ``x.dtype``; differentiable w.r.t. ``x``."""
    return _run(ops.quant_linear_ref, x, bias, (x, qweight, qzeros, scales, g_idx, bias, bits, in_features))


@contextmanager
def use_backend(name: str | None):
    """Force ``name`` for every :func:`quant_linear` call inside the block (``None``: automatic choice).

    A forced backend that cannot run a layer raises ``ValueError`` naming the reason (it never silently
    falls back).
    """
    global _forced
    if name is not None and name not in BACKENDS:
        raise ValueError(f"unknown kernel backend {name!r}; choose one of {list(BACKENDS)} or None")
    previous, _forced = _forced, name
    try:
        yield
    finally:
        _forced = previous


# ------------------------------------------------------------------------------------------- selection
def _fingerprint(tensors) -> tuple:
    return tuple((t.data_ptr(), t._version) for t in tensors)


def _packed(layer) -> tuple:
    buffers = getattr(layer, "_buffers", None)  # nn.Module: skip its slow __getattr__ on the hot path
    if buffers is not None and "qweight" in buffers and "g_idx" in buffers:
        return buffers["qweight"], buffers["qzeros"], buffers["scales"], buffers["g_idx"]
    return layer.qweight, layer.qzeros, layer.scales, layer.g_idx


def _fresh(cache: dict, packed: tuple) -> dict:
    """Empty ``cache`` if a packed tensor was replaced, moved or modified in place since it was filled."""
    if not torch.compiler.is_compiling():
        fp = _fingerprint(packed)
        if cache.get("fingerprint") != fp:
            cache.clear()
            cache["fingerprint"] = fp
    return cache


def _cache(layer) -> dict:
    return _fresh(layer._kernel_cache, _packed(layer))


@torch.compiler.disable
def _int4_plan(layer, cache: dict):
    plan = cache.get("int4-plan")
    if plan is None:
        plan = _cpu.plan_int4_groups(layer.g_idx, layer.scales.shape[0], layer.in_features)
        cache["int4-plan"] = plan
    return plan


def _reason(name: str, layer, device_type: str, dtype: torch.dtype, cache: dict) -> str | None:
    if name == "reference":
        return None
    if name in ("cpu-int8", "cpu-int4"):
        if device_type != "cpu":
            return f"{name} runs on CPU tensors, got {device_type}"
        if dtype not in _cpu.FAST_DTYPES:
            return f"{name} takes float32 or bfloat16 activations, got {dtype}"
        if name == "cpu-int8":
            return _cpu.int8_unsupported(layer.bits, layer.scales.shape[0])
        why = _cpu.int4_unsupported(layer.bits, None)
        return why if why is not None else _cpu.int4_unsupported(layer.bits, _int4_plan(layer, cache))
    if name == "triton":
        if device_type != "cuda":
            return f"triton runs on CUDA tensors, got {device_type}"
        if not triton_available():
            return "triton is not installed (or failed to import)"
        if dtype not in (torch.float16, torch.bfloat16, torch.float32):
            return f"triton takes float16/bfloat16/float32 activations, got {dtype}"
        if layer.bits not in (2, 3, 4, 8):
            return f"triton supports bits 2/3/4/8, got {layer.bits}"
        return None
    if name in BACKENDS:
        return f"{name} runs int8-activation layers (Int8MixedLinear, W8A8Linear), not weight-only QuantLinear"
    raise ValueError(f"unknown kernel backend {name!r}")


def _select(layer, device: torch.device, dtype: torch.dtype, cache: dict) -> str:
    key = ("backend", _forced, device.type, dtype)
    name = cache.get(key)
    if name is not None:
        return name
    if _forced is not None:
        why = _reason(_forced, layer, device.type, dtype, cache)
        if why is not None:
            raise ValueError(f"kernel backend {_forced!r} cannot run this layer: {why}")
        name = _forced
    else:
        name = next(
            (n for n in _AUTO_ORDER.get(device.type, ()) if _reason(n, layer, device.type, dtype, cache) is None),
            "reference",
        )
    cache[key] = name
    return name


def unsupported_reason(layer, name: str, x: torch.Tensor | None = None) -> str | None:
    """Why backend ``name`` cannot run ``layer`` (for activations like ``x``); ``None`` when it can."""
    device, dtype = _device_dtype(layer, x)
    return _reason(name, layer, device.type, dtype, _cache(layer))


def _device_dtype(layer, x) -> tuple[torch.device, torch.dtype]:
    if x is not None:
        return x.device, x.dtype
    return layer.qweight.device, layer.scales.dtype


def backend_for(layer, x: torch.Tensor | None = None) -> str:
    """The backend :func:`quant_linear` would use for ``layer`` (activations like ``x``; default: on the
    layer's device in the dtype of its scales). Raises like :func:`quant_linear` for an inapplicable forced
    backend."""
    device, dtype = _device_dtype(layer, x)
    return _select(layer, device, dtype, _cache(layer))


# ---------------------------------------------------------------------------------------------- running
@torch.compiler.disable
def _prepare(layer, name: str, cache: dict) -> tuple:
    """The backend's prepared tensors, as the trailing arguments of its op (built once per cache)."""
    key = ("state", name)
    state = cache.get(key)
    if state is None:
        args = (layer.qweight, layer.qzeros, layer.scales)
        if name == "cpu-int8":
            st = _cpu.prepare_int8(*args, layer.bits, layer.in_features)
            state = (st["w_int8"], st["scale_bf16"], st["zero_corr"], st["pad_k"])
        elif name == "cpu-int4":
            st = _cpu.prepare_int4(*args, layer.bits, layer.in_features, _int4_plan(layer, cache))
            state = (st["packed"], st["scales_zeros"], st["perm"], st["group_k"], st["pad_k"])
        else:
            state = ()
        cache[key] = state
    return state


_OPS = {
    "reference": ops.quant_linear_ref,
    "cpu-int8": ops.quant_linear_int8_cpu,
    "cpu-int4": ops.quant_linear_int4_cpu,
    "triton": ops.quant_linear_triton,
}


def _needs_op(x: torch.Tensor, bias) -> bool:
    """Whether to go through the custom op (autograd, tracing, subclasses, meta) rather than call the
    implementation directly (plain eager inference: saves the ~15 us custom-op dispatch)."""
    return (
        torch.compiler.is_compiling()
        or type(x) is not torch.Tensor
        or not (x.is_cpu or x.is_cuda)
        or (torch.is_grad_enabled() and (x.requires_grad or (bias is not None and bias.requires_grad)))
    )


# Training through a packed layer on CPU (LoRA) at this many rows or more runs dequantize + GEMM in x's dtype: the
# int kernels cost about M GEMVs, and the weight is dequantized for the backward anyway (measured on 2 cores,
# 512 x 2048 -> 5632 fp32: int4 kernel 2.0x the GEMM, C++ dequantize 0.05x).
TRAIN_DEQUANT_MIN_ROWS = 32


def _trains_at_batch(x: torch.Tensor, bias) -> bool:
    return (torch.is_grad_enabled() and (x.requires_grad or (bias is not None and bias.requires_grad))
            and x.numel() >= TRAIN_DEQUANT_MIN_ROWS * x.shape[-1])


def _run(op, x, bias, args):
    return op(*args) if _needs_op(x, bias) else ops.IMPLS[op](*args)


def quant_linear(x: torch.Tensor, layer) -> torch.Tensor:
    """``layer``'s output for ``x [..., in_features]`` with the best backend available (see the module doc)."""
    packed = _packed(layer)
    cache = _fresh(layer._kernel_cache, packed)
    name = _select(layer, x.device, x.dtype, cache)
    bias = layer.bias
    if name in ("cpu-int8", "cpu-int4") and _trains_at_batch(x, bias):
        name = "reference"
    extra = ()
    if name in ("cpu-int8", "cpu-int4"):
        extra = cache.get(("state", name))
        if extra is None:
            extra = _prepare(layer, name, cache)
    if name == "cpu-int4" and not _needs_op(x, bias):  # the decode hot path, straight to the kernel
        return _cpu.int4_linear(x, bias, *extra, packed[2].shape[1])
    if name == "cpu-int8" and not _needs_op(x, bias):
        return _cpu.int8_linear(x, bias, *extra)
    return _run(_OPS[name], x, bias, (x, *packed, bias, layer.bits, layer.in_features, *extra))
