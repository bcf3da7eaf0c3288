"""Round-to-nearest (RTN) weight quantization: per output channel or per group along the input dimension.

No calibration data: each group's range is its own min/max (asymmetric, widened to include zero so the
zero code is a valid unsigned code) or absmax (symmetric, zero code at the midpoint ``2**(bits-1)``).
"""

from __future__ import annotations

import torch

from ..quant.affine import QuantSpec, all_finite, qparams_from_minmax, quantize, reduce_minmax
from ..quant.layout import QuantizedWeight, check_bits, default_g_idx


def weight_spec(bits: int, group_size: int, in_features: int, sym: bool) -> QuantSpec:
    """The affine spec for packed weights: unsigned codes, groups along the input dimension."""
    return QuantSpec(
        bits=bits,
        symmetric=sym,
        signed=False,
        granularity="group",
        group_size=in_features if group_size == -1 else group_size,
    )


def check_finite(weight: torch.Tensor, name: str = "weight") -> None:
    if not all_finite(weight):
        bad = (~torch.isfinite(weight)).sum().item()
        raise ValueError(
            f"{name} contains {bad} NaN or inf values: quantizing it would give a silently wrong model. "
            "Fix the checkpoint (or skip this module with modules_to_not_convert)."
        )


def group_qparams(
    weight: torch.Tensor, bits: int, group_size: int, sym: bool, scale_dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-group scales (rounded to ``scale_dtype``, as stored) and unsigned zero codes, both ``[out, n_groups]``."""
    lo, hi = reduce_minmax(weight.float(), weight_spec(bits, group_size, weight.shape[1], sym))
    return qparams_from_range(lo, hi, bits, sym, scale_dtype)


def qparams_from_range(
    lo: torch.Tensor, hi: torch.Tensor, bits: int, sym: bool, scale_dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """The packed layout's scales and unsigned zero codes for per-group ranges ``[lo, hi]`` (from min/max or an
    observer)."""
    if sym:
        # GPTQ's symmetric grid: zero code 2**(bits-1), step 2*absmax/(2**bits - 1), so all 2**bits codes are
        # used (the top one clips +absmax by half a step, the bottom reaches -absmax - step/2).
        absmax = torch.maximum(lo.abs(), hi.abs()).double()
        qmax = (1 << bits) - 1
        scale = (2 * absmax / qmax).clamp(min=torch.finfo(torch.float32).eps * absmax.clamp(min=1.0)).float()
        zeros = torch.full_like(scale, 1 << (bits - 1), dtype=torch.int32)
        return scale.to(scale_dtype), zeros
    # Keep zero representable (the layout stores the zero point as an unsigned code) and the zero code
    # >= 1: GPTQ v1 checkpoints store z - 1, which cannot hold z = 0. A group of non-negative weights
    # gives up one level at the bottom for it.
    lo, hi = lo.clamp(max=0), hi.clamp(min=0)
    lo = torch.minimum(lo, -hi / ((1 << bits) - 2))
    spec = QuantSpec(bits=bits, symmetric=False, signed=False, granularity="tensor")
    scale, zero = qparams_from_minmax(lo, hi, spec)
    scale = scale.to(scale_dtype)
    zeros = (-zero).clamp(1, (1 << bits) - 1).to(torch.int32)
    return scale, zeros


def codes_for(weight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, g_idx: torch.Tensor, bits: int):
    """Round ``weight [out, in]`` to unsigned codes under per-group ``scales``/``zeros`` (columns map via g_idx)."""
    gi = g_idx.long()
    spec = QuantSpec(bits=bits, symmetric=False, signed=False)
    return quantize(weight.float(), scales[:, gi].float(), -zeros[:, gi], spec)


def rtn_quantize(
    weight: torch.Tensor, bits: int, group_size: int = -1, sym: bool = True, scale_dtype: torch.dtype | None = None
) -> QuantizedWeight:
    """Quantize a float ``weight [out, in]`` by rounding to nearest."""
    check_bits(bits)
    if weight.dim() != 2:
        raise ValueError(f"rtn_quantize expects a 2-D weight [out, in], got shape {tuple(weight.shape)}")
    check_finite(weight)
    scale_dtype = scale_dtype or (weight.dtype if weight.is_floating_point() else torch.float32)
    scales, zeros = group_qparams(weight, bits, group_size, sym, scale_dtype)
    g_idx = default_g_idx(weight.shape[1], group_size, device=weight.device)
    codes = codes_for(weight, scales, zeros, g_idx, bits)
    return QuantizedWeight(codes, scales, zeros, g_idx, bits, group_size)
