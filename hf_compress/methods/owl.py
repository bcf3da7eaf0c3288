"""OWL (Yin et al., 2024, "Outlier Weighed Layerwise Sparsity"): a per-block sparsity schedule for Wanda and SparseGPT.

A block's outlier ratio is the fraction of its Wanda scores ``|W_ij| * ||X_j||_2`` (over all its linears together)
above ``m`` times their mean, measured on the unpruned model. Blocks with more outliers keep more weights: the ratios
are mapped linearly onto densities spanning ``2 * lam`` and shifted so their mean is ``1 - sparsity``, so the model's
average sparsity is unchanged (every block holds the same linears) while each block's lies within ``2 * lam`` of it.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def outlier_ratio(scores: Sequence[torch.Tensor], m: float) -> float:
    """The fraction of all entries of ``scores`` (one block's Wanda scores, any shapes) above ``m`` x their mean."""
    numel = sum(s.numel() for s in scores)
    if numel == 0:
        raise ValueError("outlier_ratio needs at least one score")
    mean = float(sum(s.detach().sum(dtype=torch.float64) for s in scores)) / numel
    return float(sum(int((s.detach().double() > m * mean).sum()) for s in scores)) / numel


def owl_sparsities(ratios: Sequence[float], sparsity: float, lam: float) -> list[float]:
    """Each block's sparsity from its outlier ratio: densities ``1 - sparsity + lam * (2 t - mean(2 t))`` with ``t``
    the ratios rescaled to [0, 1] (all blocks alike when the ratios are equal); an error if one leaves [0, 1)."""
    r = torch.tensor(list(ratios), dtype=torch.float64)
    if r.numel() == 0:
        raise ValueError("owl_sparsities needs the outlier ratio of at least one block")
    spread = r.max() - r.min()
    t = (r - r.min()) / spread if spread > 0 else torch.zeros_like(r)
    density = 2 * lam * t
    density = density - density.mean() + (1 - sparsity)
    out = (1 - density).tolist()
    if min(out) < 0 or max(out) >= 1:
        raise ValueError(
            f"OWL with owl_lambda={lam} at sparsity {sparsity} gives block sparsities in [{min(out):.3f}, {max(out):.3f}], "
            "outside [0, 1): lower owl_lambda"
        )
    return out
