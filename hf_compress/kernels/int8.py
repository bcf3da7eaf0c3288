"""Backend choice and forward for the int8-activation layers (``Int8MixedLinear``, ``W8A8Linear``).

==============  =================================================================================
backend         applies to
==============  =================================================================================
``cpu-onednn``  CPU, float activations, when PyTorch has oneDNN (``onednn::qlinear_pointwise``)
``cpu-int-mm``  CPU, float activations (``torch._int_mm``)
``triton``      CUDA, fp16/bf16/fp32 activations, when triton imports
``reference``   everything (:func:`hf_compress.quant.int8.int8_linear_reference`, float64 sums)
==============  =================================================================================

LLM.int8's outlier columns are found here, for every backend: they are zeroed in the int8 input and
multiply the dequantized weight columns in float32. Outputs are cast to ``x.dtype``. The backward is the
straight-through estimate ``grad_x = grad_out @ W`` (``W`` the dequantized, de-smoothed weight), so adapters
train through these layers; the int8 state is frozen.
"""

from __future__ import annotations

import torch

from ..quant.int8 import scale_from_absmax
from .cpu import w8a8 as _cpu
from .ste import with_dequantized_backward
from .triton import is_available as triton_available

INT8_BACKENDS = ("reference", "cpu-onednn", "cpu-int-mm", "triton")
_AUTO_ORDER = {"cpu": ("cpu-onednn", "cpu-int-mm"), "cuda": ("triton",)}


def _forced() -> str | None:
    from . import _forced as forced  # set by hf_compress.kernels.use_backend

    return forced


def unsupported_reason(name: str, device_type: str, dtype: torch.dtype) -> str | None:
    """Why backend ``name`` cannot run an int8-activation layer (``None`` when it can)."""
    if name == "reference":
        return None
    if name not in INT8_BACKENDS:
        return f"{name} runs weight-only QuantLinear layers; int8-activation layers run on {list(INT8_BACKENDS)}"
    if not dtype.is_floating_point:
        return f"{name} takes float activations, got {dtype}"
    if name in ("cpu-onednn", "cpu-int-mm"):
        if device_type != "cpu":
            return f"{name} runs on CPU tensors, got {device_type}"
        if name == "cpu-onednn" and not _cpu.onednn_available():
            return "this torch build has no oneDNN quantized linear (onednn::qlinear_pointwise)"
        if name == "cpu-onednn" and not _cpu.has_vnni():
            # Without VNNI oneDNN multiplies u8 x s8 with vpmaddubsw, whose int16 pair sums saturate (measured here:
            # 10% error in a tiny Llama's logits); torch._int_mm stays exact.
            return "this CPU has no VNNI int8 dot product, and oneDNN's AVX2 u8 x s8 path saturates: use cpu-int-mm"
        return None
    if device_type != "cuda":
        return f"triton runs on CUDA tensors, got {device_type}"
    if not triton_available():
        return "triton is not installed (or failed to import)"
    if dtype not in (torch.float16, torch.bfloat16, torch.float32):
        return f"triton takes float16/bfloat16/float32 activations, got {dtype}"
    return None


def _fresh_cache(layer) -> dict:
    cache = layer._kernel_cache
    if not torch.compiler.is_compiling():
        fp = tuple((t.data_ptr(), t._version) for t in layer._buffers.values() if t is not None)
        if cache.get("fingerprint") != fp:
            cache.clear()
            cache["fingerprint"] = fp
    return cache


def backend_for(layer, x: torch.Tensor | None = None) -> str:
    """The backend :func:`int8_linear` uses for ``layer`` with activations like ``x``."""
    device = x.device if x is not None else layer.SCB.device
    dtype = x.dtype if x is not None else (layer.bias.dtype if layer.bias is not None else torch.float32)
    return _select(_fresh_cache(layer), device.type, dtype)


def _select(cache: dict, device_type: str, dtype: torch.dtype) -> str:
    forced = _forced()
    key = ("backend", forced, device_type, dtype)
    name = cache.get(key)
    if name is not None:
        return name
    if forced is not None:
        why = unsupported_reason(forced, device_type, dtype)
        if why is not None:
            raise ValueError(f"kernel backend {forced!r} cannot run this layer: {why}")
        name = forced
    else:
        name = next((n for n in _AUTO_ORDER.get(device_type, ()) if unsupported_reason(n, device_type, dtype) is None), "reference")
    cache[key] = name
    return name


def _prepared(layer, cache: dict, name: str) -> dict:
    state = cache.get(("state", name))
    if state is None:
        w_scale = layer.weight_scale
        if name.startswith("cpu-"):
            state = _cpu.prepare_state(layer.weight, w_scale, name)
        else:
            state = {"weight": layer.weight.contiguous(), "w_scale": w_scale.contiguous()}
        smooth = layer.smooth_divisor
        state["inv_smooth"] = None if smooth is None else (1.0 / smooth.float()).contiguous()
        state["smooth"] = None if smooth is None else smooth.float().contiguous()
        cache[("state", name)] = state
    return state


def _add_outlier_part(out: torch.Tensor, x2: torch.Tensor, idx: torch.Tensor, state: dict) -> torch.Tensor:
    """LLM.int8's float path: ``out += x[:, idx] @ W[:, idx].T`` in float32 for the outlier columns ``idx``.

    Gathering columns of the ``[N, K]`` int8 weight costs ~1 ms at 2048x5632 (a cache line per row and
    column), more than the int8 GEMV itself, and the outlier set changes from token to token as occasional
    outliers come and go. So every column once gathered is kept dequantized, as a row of a per-layer float32
    cache (up to ``K/16`` columns, 25% of the int8 weight's bytes at most; a model's outlier features are a
    few channels). A few rows (decode) scatter their outlier activations into a ``[M, cached]`` matrix that
    multiplies the whole cache; more rows multiply just their columns, copied out of the cache.

    The product accumulates into ``out`` (``addmm_``): a separate product allocates a fresh float32 ``[M, N]``
    and faults its pages in, 7.3 ms against 2.3 ms at 1024x32x5632 (a fifth of the layer's time), plus an add."""
    weight, w_scale = state["weight"], state["w_scale"]
    k = weight.shape[1]
    if "col_slot" not in state:
        state["col_slot"] = torch.full((k,), -1, dtype=torch.long, device=weight.device)
        state["col_rows"] = torch.empty((0, weight.shape[0]), dtype=torch.float32, device=weight.device)
    slot, rows = state["col_slot"], state["col_rows"]
    slots = slot[idx]
    new = idx[slots < 0]
    if new.numel():
        room = max(32, k // 16) - rows.shape[0]
        if room > 0:
            add = new[:room]
            slot[add] = torch.arange(rows.shape[0], rows.shape[0] + add.numel(), device=slot.device)
            rows = state["col_rows"] = torch.cat([rows, weight.index_select(1, add).t().float().mul_(w_scale)])
            slots, new = slot[idx], new[room:]
        if new.numel():  # cache full: gather the rest directly
            w_new = weight.index_select(1, new).t().float().mul_(w_scale)
            out.addmm_(x2.index_select(1, new).float(), w_new)
    cached = slots >= 0
    if not bool(cached.all()):
        slots, idx_c = slots[cached], idx[cached]
    else:
        idx_c = idx
    x_out = x2.index_select(1, idx_c).float()
    if x2.shape[0] > 4:
        # many rows: multiply only this batch's columns (copying them out of the cache is cheap beside the GEMM)
        return out.addmm_(x_out, rows.index_select(0, slots))
    # a few rows (decode): scatter into the cache's column space, no copy of weight rows
    x_cached = x2.new_zeros((x2.shape[0], rows.shape[0]), dtype=torch.float32)
    x_cached[:, slots] = x_out
    return out.addmm_(x_cached, rows)


def _forward(x: torch.Tensor, layer) -> torch.Tensor:
    cache = _fresh_cache(layer)
    name = _select(cache, x.device.type, x.dtype)
    if name == "reference":
        return layer.forward_reference(x)
    state = _prepared(layer, cache, name)
    x2 = x.reshape(-1, x.shape[-1])
    bias = layer.bias
    if name == "triton":
        from .triton.int8 import int8_matmul, quantize_rows

        idx = mask = None
        if layer.threshold is not None:
            mask = x2.abs().amax(dim=0) >= layer.threshold
            idx = mask.nonzero().squeeze(1) if bool(mask.any()) else None
        scale = layer.static_scale
        scale = scale.float() if scale is not None else None
        if scale is None and layer.per_tensor:
            xf = x2.float() if state["inv_smooth"] is None else x2.float() * state["inv_smooth"]
            scale = scale_from_absmax(xf.abs().amax())
        q, row_scale = quantize_rows(x2, state["smooth"], scale, mask if idx is not None else None)
        out = int8_matmul(q, row_scale, state["weight"], state["w_scale"], bias if idx is None else None, torch.float32)
        if idx is not None and bias is not None:
            out = out.add_(bias.float())
    else:
        out, idx = _cpu.int8_gemm(
            x2,
            state,
            bias,
            inv_smooth=state["inv_smooth"],
            act_scale=layer.static_scale,
            per_tensor=layer.per_tensor,
            threshold=layer.threshold,
        )
    if idx is not None:
        out = _add_outlier_part(out, x2, idx, state)
    return out.to(x.dtype).reshape(*x.shape[:-1], out.shape[-1])


def int8_linear(x: torch.Tensor, layer) -> torch.Tensor:
    """``layer``'s output for ``x [..., in_features]`` with the best backend available (see the module doc)."""
    return with_dequantized_backward(lambda x, layer, bias: _forward(x, layer), x, layer, layer.bias)
