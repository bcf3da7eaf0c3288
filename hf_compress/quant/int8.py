"""Int8 math for weights and activations (LLM.int8, W8A8), no transformers import.

One convention for both, bitsandbytes' ``weight`` + ``SCB``: a row ``v`` (a weight's output row, or an
activation's token) has ``absmax = max|v|`` and ``scale = absmax / 127``; its codes are
``clamp(round(v / scale), -127, 127)`` (int8, the symmetric restricted range, so ``-x`` quantizes to
``-q``) and it dequantizes to ``q * scale``. A row of zeros gets ``scale = 1`` and codes 0. Static
activation quantization uses one fixed ``scale`` for every row instead.

SmoothQuant (Xiao et al. 2023) moves activation outliers into the weights with a per-input-channel factor
``s_j = max|X_j|^alpha / max|W_j|^(1 - alpha)``: ``X W^T = (X / s)(W * s)^T`` exactly, and both factors
quantize better. Per-channel activation scales cannot be factored out of an int8 GEMM, so this is the only
form in which they exist.
"""

from __future__ import annotations

import torch

from .affine import all_finite

__all__ = [
    "INT8_MAX",
    "absmax_rows",
    "check_finite",
    "dequantize_rows",
    "int8_linear_reference",
    "outlier_columns",
    "quantize_rows",
    "scale_from_absmax",
    "smooth_factors",
]

INT8_MAX = 127


def check_finite(x: torch.Tensor, what: str) -> None:
    if not all_finite(x):
        bad = int((~torch.isfinite(x)).sum())
        raise ValueError(f"{what} contains NaN or inf ({bad} values): cannot quantize it; fix the model or its inputs")


def absmax_rows(v: torch.Tensor) -> torch.Tensor:
    """``max |v|`` over the last dimension, float32 ``[...]``."""
    return v.detach().abs().amax(dim=-1).float()


def scale_from_absmax(absmax: torch.Tensor) -> torch.Tensor:
    """``absmax / 127``, and 1 for rows of zeros (their codes are 0 whatever the scale)."""
    absmax = absmax.float()
    return torch.where(absmax > 0, absmax / INT8_MAX, torch.ones_like(absmax))


def quantize_rows(v: torch.Tensor, scale: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(codes int8 [..., K], scale float32 [...])``; per row from its absmax, or the given ``scale``
    (a 0-d tensor for static per-tensor quantization, or one per row)."""
    vf = v.detach().float()
    if scale is None:
        scale = scale_from_absmax(absmax_rows(vf))
    scale = scale.float()
    s = scale.unsqueeze(-1) if scale.dim() else scale
    q = torch.round(vf / s).clamp_(-INT8_MAX, INT8_MAX).to(torch.int8)
    return q, scale.expand(v.shape[:-1]) if not scale.dim() else scale


def dequantize_rows(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """float32 ``q * scale`` (``scale`` per row, or 0-d)."""
    s = scale.float()
    return q.float() * (s.unsqueeze(-1) if s.dim() else s)


def outlier_columns(x: torch.Tensor, threshold: float) -> torch.Tensor:
    """LLM.int8's outlier input features: bool ``[K]``, the columns where any ``|x| >= threshold``."""
    return (x.detach().abs() >= threshold).reshape(-1, x.shape[-1]).any(dim=0)


def smooth_factors(act_absmax: torch.Tensor, weight_absmax: torch.Tensor, alpha: float) -> torch.Tensor:
    """SmoothQuant's per-input-channel divisor ``s [K]`` (float32, >= a small floor, 1 for dead channels)."""
    a = act_absmax.float().clamp(min=1e-5)
    w = weight_absmax.float().clamp(min=1e-5)
    s = a.pow(alpha) / w.pow(1 - alpha)
    dead = act_absmax <= 0
    return torch.where(dead, torch.ones_like(s), s.clamp(min=1e-5))


def int8_linear_reference(
    x: torch.Tensor,
    weight: torch.Tensor,
    weight_scale: torch.Tensor,
    bias: torch.Tensor | None,
    *,
    act_scale: torch.Tensor | None = None,
    per_tensor: bool = False,
    smooth: torch.Tensor | None = None,
    threshold: float | None = None,
) -> torch.Tensor:
    """The plain-PyTorch forward every int8 fast path is tested against, in ``x.dtype``.

    ``x [..., K]``; ``weight`` int8 codes ``[N, K]`` with ``weight_scale [N]``; the activation is divided by
    ``smooth [K]`` when given (as a multiplication by ``1/smooth``, like the fast paths), then quantized
    per token, per tensor (``per_tensor``) or with the fixed ``act_scale``. With ``threshold`` (LLM.int8), the outlier columns of ``x`` skip quantization: they
    multiply the dequantized weight columns in float32 and the two sums are added.
    """
    shape = x.shape
    xf = x.detach().reshape(-1, shape[-1]).float()
    if smooth is not None:
        xf = xf * (1.0 / smooth.float())
    w_scale = weight_scale.float()
    out_float = None
    if threshold is not None:
        cols = outlier_columns(xf, threshold)
        if bool(cols.any()):
            w_cols = dequantize_rows(weight[:, cols], w_scale)
            out_float = xf[:, cols].double() @ w_cols.double().t()
            xf = xf.masked_fill(cols, 0.0)
    if act_scale is None and per_tensor:
        act_scale = scale_from_absmax(xf.abs().amax())
    q, s = quantize_rows(xf, act_scale)
    # float64 is exact for int8 products summed over any realistic K (|sum| < 2^53).
    acc = q.double() @ weight.double().t()
    out = acc * s.double().unsqueeze(-1) * w_scale.double()
    if out_float is not None:
        out = out + out_float
    if bias is not None:
        out = out + bias.double()
    return out.to(x.dtype).reshape(*shape[:-1], weight.shape[0])
