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


WEIGHT_OBSERVERS = ("minmax", "mse")
# "mse": each group's min/max range times 1, 0.99, ..., 0.80, keeping the factor with the least squared rounding
# error (ties keep the wider range). A few outliers no longer stretch the step for the whole group; the grid is
# the GPTQ reference quantizer's (``mse=True``: 100 steps), over its first 20.
CLIP_GRID, CLIP_STEPS = 100, 20


def check_observer(observer: str) -> None:
    if observer not in WEIGHT_OBSERVERS:
        raise ValueError(f"observer must be one of {list(WEIGHT_OBSERVERS)}, got {observer!r}")


def group_qparams(
    weight: torch.Tensor, bits: int, group_size: int, sym: bool, scale_dtype: torch.dtype, observer: str = "minmax"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-group scales (rounded to ``scale_dtype``, as stored) and unsigned zero codes, both ``[out, n_groups]``;
    ``observer``: each group's min/max (``"minmax"``) or the clipped range with the least error (``"mse"``)."""
    check_observer(observer)
    w = weight.float()
    lo, hi = reduce_minmax(w, weight_spec(bits, group_size, weight.shape[1], sym))
    if observer == "minmax":
        return qparams_from_range(lo, hi, bits, sym, scale_dtype)
    gs = weight.shape[1] if group_size == -1 else group_size
    parts = [
        _least_error_qparams(w[:, g * gs : (g + 1) * gs], lo[:, g : g + 1], hi[:, g : g + 1], bits, sym, scale_dtype)
        for g in range(lo.shape[1])
    ]
    return torch.cat([s for s, _ in parts], dim=1), torch.cat([z for _, z in parts], dim=1)


def _least_error_qparams(w, lo, hi, bits: int, sym: bool, scale_dtype: torch.dtype):
    """Of the ranges ``[lo, hi] * (1 - k / CLIP_GRID)``, ``k = 0..CLIP_STEPS``, the qparams with the least squared
    error on each row of ``w [rows, cols]`` (one group per row). The candidates are tried several at a time (a
    ``[k, rows, cols]`` batch of at most ~4M values): this runs at every group start of GPTQ's column loop."""
    qmax = (1 << bits) - 1
    shrink = torch.tensor([1 - k / CLIP_GRID for k in range(CLIP_STEPS + 1)], dtype=torch.float32, device=w.device)
    s, z = qparams_from_range(lo * shrink, hi * shrink, bits, sym, scale_dtype)  # [rows, k]
    sf, zf = s.float().t()[:, :, None], z.float().t()[:, :, None]  # [k, rows, 1]
    err = torch.empty(CLIP_STEPS + 1, w.shape[0], dtype=torch.float32, device=w.device)
    step = max(1, (1 << 22) // max(1, w.numel()))
    for k in range(0, CLIP_STEPS + 1, step):
        ks, kz = sf[k : k + step], zf[k : k + step]
        q = (w / ks).round_().add_(kz).clamp_(0, qmax)
        err[k : k + step] = q.sub_(kz).mul_(ks).sub_(w).square_().sum(dim=2)
    best = err.argmin(dim=0, keepdim=True).t()  # the first minimum: ties keep the wider range
    return s.gather(1, best), z.gather(1, best)


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
    weight: torch.Tensor,
    bits: int,
    group_size: int = -1,
    sym: bool = True,
    scale_dtype: torch.dtype | None = None,
    observer: str = "minmax",
) -> QuantizedWeight:
    """Quantize a float ``weight [out, in]`` by rounding to nearest (ranges as :func:`group_qparams` chooses)."""
    check_bits(bits)
    if weight.dim() != 2:
        raise ValueError(f"rtn_quantize expects a 2-D weight [out, in], got shape {tuple(weight.shape)}")
    check_finite(weight)
    scale_dtype = scale_dtype or (weight.dtype if weight.is_floating_point() else torch.float32)
    scales, zeros = group_qparams(weight, bits, group_size, sym, scale_dtype, observer)
    g_idx = default_g_idx(weight.shape[1], group_size, device=weight.device)
    codes = codes_for(weight, scales, zeros, g_idx, bits)
    return QuantizedWeight(codes, scales, zeros, g_idx, bits, group_size)
