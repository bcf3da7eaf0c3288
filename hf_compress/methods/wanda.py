"""Wanda (Sun et al., 2023): prune by ``|W_ij| * ||X_j||_2``, compared within each output row.

The input norms come from calibration activations; no weight update. ``WandaStats`` is the observer the
layer-wise driver feeds (one per group of linears sharing an input).
"""

from __future__ import annotations

import torch

from ..quant.sparse import select_mask
from .rtn import check_finite


class WandaStats:
    """Accumulates ``sum_t x_tj^2`` over the calibration tokens of one linear's input."""

    def __init__(self, in_features: int, device=None):
        self.in_features = in_features
        self.nsamples = 0
        self.sq = torch.zeros(in_features, dtype=torch.float64, device=device)

    def add_batch(self, x: torch.Tensor) -> None:
        if x.shape[-1] != self.in_features:
            raise ValueError(f"add_batch expects inputs [..., {self.in_features}], got shape {tuple(x.shape)}")
        x = x.detach().reshape(-1, self.in_features)
        self.nsamples += x.shape[0]
        self.sq += x.to(self.sq.device, torch.float64).square().sum(0)

    def norms(self) -> torch.Tensor:
        if self.nsamples == 0:
            raise ValueError("no calibration data: call add_batch() with the layer's inputs before pruning with Wanda")
        return self.sq.sqrt().float()


def wanda_mask(weight: torch.Tensor, stats: WandaStats, sparsity: float | None = None,
               pattern: tuple[int, int] | None = None) -> torch.Tensor:
    """Keep-mask of ``weight [out, in]`` from the Wanda scores."""
    check_finite(weight)
    norms = stats.norms().to(weight.device)
    check_finite(norms, "the calibration activations")
    return select_mask(weight.detach().float().abs() * norms[None, :], sparsity, pattern)
