"""The backward shared by layers whose forward runs integer kernels (int8 activations, packed low-bit weights):
the straight-through estimate ``grad_x = grad_out @ W`` with ``W`` the layer's dequantized weight, so adapters
(LoRA) train on a frozen quantized base."""

from __future__ import annotations

from collections.abc import Callable

import torch


class DequantizedBackward(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, bias, layer, run: Callable):
        ctx.layer = layer
        ctx.bias_dtype = bias.dtype if bias is not None else None
        with torch.no_grad():
            return run(x, layer, bias)

    @staticmethod
    def backward(ctx, grad):
        grad_x = grad_bias = None
        if ctx.needs_input_grad[0]:
            grad_x = grad @ ctx.layer.dequantize_weight().to(grad.dtype)
        if ctx.needs_input_grad[1]:
            grad_bias = grad.reshape(-1, grad.shape[-1]).sum(0).to(ctx.bias_dtype)
        return grad_x, grad_bias, None, None


def with_dequantized_backward(run: Callable, x: torch.Tensor, layer, bias: torch.Tensor | None) -> torch.Tensor:
    """``run(x, layer, bias)``, differentiable (straight-through) when ``x`` or ``bias`` needs a gradient."""
    if torch.is_grad_enabled() and (x.requires_grad or (bias is not None and bias.requires_grad)):
        return DequantizedBackward.apply(x, bias, layer, run)
    return run(x, layer, bias)
