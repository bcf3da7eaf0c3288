"""The kernels as ``torch.library`` custom ops in the ``hf_compress`` namespace.

Every linear op takes the packed layout first, ``(x, qweight, qzeros, scales, g_idx, bias, bits,
in_features)``, then whatever its backend prepared. Each has a fake (meta) implementation so
``torch.compile`` traces through it, and the same autograd formula: ``grad_x = grad_out @ W`` with ``W``
dequantized from the layout in ``grad_out``'s dtype (exactly the weight the reference multiplies by), and
``grad_bias = grad_out`` summed over rows when the bias requires grad. The packed weight is frozen: no
gradient flows to ``qweight``/``qzeros``/``scales``. LoRA adapters train through this backward.

Ops:

- ``hf_compress::dequantize_t``: the float weight transposed, ``[in, out]`` (used by the backward so it stays
  traceable; on CPU one pass of the C++ kernel).
- ``hf_compress::quant_linear_ref``: dequantize + ``F.linear`` in ``x.dtype`` (the reference, and the training
  path on CPU, where it beats the int kernels at training batch sizes).
- ``hf_compress::quant_linear_int8_cpu`` / ``quant_linear_int4_cpu``: see :mod:`hf_compress.kernels.cpu`.
- ``hf_compress::quant_linear_triton``: the fused Triton kernel, see :mod:`hf_compress.kernels.triton`.
"""

import torch
import torch.nn.functional as F
from torch import Tensor

from . import cpu as _cpu
from .unpack import dequantize_t as _dequantize_t

# No ``from __future__ import annotations`` in this module: torch.library infers each op's schema from the
# annotations (``Tensor | None`` -> ``Tensor?``, ``int`` -> ``SymInt``).


# ------------------------------------------------------------------------------------------ dequantize
@torch.library.custom_op("hf_compress::dequantize_t", mutates_args=())
def dequantize_t(qweight: Tensor, qzeros: Tensor, scales: Tensor, g_idx: Tensor, bits: int, in_features: int) -> Tensor:
    return _dequantize_t(qweight, qzeros, scales, g_idx, bits, in_features)


@dequantize_t.register_fake
def _(qweight, qzeros, scales, g_idx, bits, in_features):
    return scales.new_empty((in_features, scales.shape[1]))


# ------------------------------------------------------------------------------------------- reference
def reference_impl(x, qweight, qzeros, scales, g_idx, bias, bits: int, in_features: int) -> Tensor:
    wt = _dequantize_t(qweight, qzeros, scales, g_idx, bits, in_features).to(x.dtype)
    return F.linear(x, wt.t(), bias.to(x.dtype) if bias is not None else None)


@torch.library.custom_op("hf_compress::quant_linear_ref", mutates_args=())
def quant_linear_ref(
    x: Tensor,
    qweight: Tensor,
    qzeros: Tensor,
    scales: Tensor,
    g_idx: Tensor,
    bias: Tensor | None,
    bits: int,
    in_features: int,
) -> Tensor:
    return reference_impl(x, qweight, qzeros, scales, g_idx, bias, bits, in_features)


def _out_like(x: Tensor, scales: Tensor) -> Tensor:
    return x.new_empty((*x.shape[:-1], scales.shape[1]))


@quant_linear_ref.register_fake
def _(x, qweight, qzeros, scales, g_idx, bias, bits, in_features):
    return _out_like(x, scales)


# ------------------------------------------------------------------------------------------- cpu int8
def int8_impl(x, qweight, qzeros, scales, g_idx, bias, bits, in_features, w_int8, scale_bf16, zero_corr, pad_k):
    return _cpu.int8_linear(x, bias, w_int8, scale_bf16, zero_corr, pad_k)


@torch.library.custom_op("hf_compress::quant_linear_int8_cpu", mutates_args=())
def quant_linear_int8_cpu(
    x: Tensor,
    qweight: Tensor,
    qzeros: Tensor,
    scales: Tensor,
    g_idx: Tensor,
    bias: Tensor | None,
    bits: int,
    in_features: int,
    w_int8: Tensor,
    scale_bf16: Tensor,
    zero_corr: Tensor | None,
    pad_k: int,
) -> Tensor:
    return int8_impl(x, qweight, qzeros, scales, g_idx, bias, bits, in_features, w_int8, scale_bf16, zero_corr, pad_k)


@quant_linear_int8_cpu.register_fake
def _(x, qweight, qzeros, scales, g_idx, bias, bits, in_features, w_int8, scale_bf16, zero_corr, pad_k):
    return _out_like(x, scales)


# ------------------------------------------------------------------------------------------- cpu int4
def int4_impl(x, qweight, qzeros, scales, g_idx, bias, bits, in_features, packed, scales_zeros, perm, group_k, pad_k):
    return _cpu.int4_linear(x, bias, packed, scales_zeros, perm, group_k, pad_k, scales.shape[1])


@torch.library.custom_op("hf_compress::quant_linear_int4_cpu", mutates_args=())
def quant_linear_int4_cpu(
    x: Tensor,
    qweight: Tensor,
    qzeros: Tensor,
    scales: Tensor,
    g_idx: Tensor,
    bias: Tensor | None,
    bits: int,
    in_features: int,
    packed: Tensor,
    scales_zeros: Tensor,
    perm: Tensor | None,
    group_k: int,
    pad_k: int,
) -> Tensor:
    return int4_impl(
        x, qweight, qzeros, scales, g_idx, bias, bits, in_features, packed, scales_zeros, perm, group_k, pad_k
    )


@quant_linear_int4_cpu.register_fake
def _(x, qweight, qzeros, scales, g_idx, bias, bits, in_features, packed, scales_zeros, perm, group_k, pad_k):
    return _out_like(x, scales)


# ---------------------------------------------------------------------------------------------- triton
def triton_impl(x, qweight, qzeros, scales, g_idx, bias, bits, in_features):
    from .triton import triton_linear

    return triton_linear(x, qweight, qzeros, scales, g_idx, bias, bits, in_features)


@torch.library.custom_op("hf_compress::quant_linear_triton", mutates_args=())
def quant_linear_triton(
    x: Tensor,
    qweight: Tensor,
    qzeros: Tensor,
    scales: Tensor,
    g_idx: Tensor,
    bias: Tensor | None,
    bits: int,
    in_features: int,
) -> Tensor:
    return triton_impl(x, qweight, qzeros, scales, g_idx, bias, bits, in_features)


@quant_linear_triton.register_fake
def _(x, qweight, qzeros, scales, g_idx, bias, bits, in_features):
    return _out_like(x, scales)


# ---------------------------------------------------------------------------------------------- autograd
def _setup_context(ctx, inputs, output):
    x, qweight, qzeros, scales, g_idx, bias, bits, in_features = inputs[:8]
    ctx.save_for_backward(qweight, qzeros, scales, g_idx)
    ctx.bits, ctx.in_features, ctx.n_inputs = bits, in_features, len(inputs)
    ctx.bias_dtype = bias.dtype if bias is not None else None


def _backward(ctx, grad):
    qweight, qzeros, scales, g_idx = ctx.saved_tensors
    grad_x = grad_bias = None
    if ctx.needs_input_grad[0]:
        wt = torch.ops.hf_compress.dequantize_t(qweight, qzeros, scales, g_idx, ctx.bits, ctx.in_features)
        grad_x = torch.matmul(grad, wt.to(grad.dtype).t())
    if ctx.needs_input_grad[5]:
        grad_bias = grad.reshape(-1, grad.shape[-1]).sum(0).to(ctx.bias_dtype)
    return (grad_x, None, None, None, None, grad_bias) + (None,) * (ctx.n_inputs - 6)


for _op in (quant_linear_ref, quant_linear_int8_cpu, quant_linear_int4_cpu, quant_linear_triton):
    _op.register_autograd(_backward, setup_context=_setup_context)

# op -> its plain-Python implementation (eager calls that need neither autograd nor tracing skip the
# ~15 us custom-op dispatch, which is 5% of a 2048x5632 int4 GEMV on a 2-core CPU).
IMPLS = {
    quant_linear_ref: reference_impl,
    quant_linear_int8_cpu: int8_impl,
    quant_linear_int4_cpu: int4_impl,
    quant_linear_triton: triton_impl,
}
