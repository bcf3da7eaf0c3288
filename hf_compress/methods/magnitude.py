"""Magnitude pruning: remove the smallest ``|W_ij|`` of each output row (or of each N:M group). No calibration."""

from __future__ import annotations

import torch

from ..quant.sparse import select_mask
from .rtn import check_finite


def magnitude_mask(weight: torch.Tensor, sparsity: float | None = None, pattern: tuple[int, int] | None = None) -> torch.Tensor:
    """Keep-mask of ``weight [out, in]``: ``sparsity`` per row, or the ``pattern`` (N, M)."""
    check_finite(weight)
    return select_mask(weight.detach().abs(), sparsity, pattern)
