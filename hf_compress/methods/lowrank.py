"""Low-rank factorisation of one linear layer: ``W [out, in] ~= up [out, r] @ down [r, in]``.

Three ways to choose the factors, each a truncated SVD of a different matrix:

- ``svd``: of ``W`` itself (minimises the weight error ``||W - up down||_F``; no calibration);
- ``asvd`` (activation-aware, after ASVD): of ``W S`` with ``S = diag(rms(x_j))^alpha`` from calibration
  activations, then ``down = down' S^-1``, so that columns which see large inputs are kept more faithfully;
- ``whiten`` (after SVD-LLM): of ``W L`` with ``X^T X = L L^T`` (Cholesky of the calibration Gram matrix), then
  ``down = down' L^-1``. ``||(W - up down) X^T||_F = ||W L - up down'||_F``, so the truncation error *is* the
  output error on the calibration data and truncated SVD is optimal for it.

The calibration statistics are GPTQ's Hessian ``H = 2/n X^T X`` (:class:`~hf_compress.methods.gptq.GPTQ`'s
``add_batch``): its scale cancels in both calibrated methods.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from .rtn import check_finite

LOWRANK_METHODS = ("svd", "asvd", "whiten")


def rank_for_ratio(in_features: int, out_features: int, param_ratio: float) -> int:
    """The largest rank whose factors keep at most ``param_ratio`` of the layer's weights: r (m + n) <= ratio m n."""
    if not 0 < param_ratio <= 1:
        raise ValueError(f"param_ratio is the fraction of each linear's weights kept and must be in (0, 1], got {param_ratio!r}")
    return max(1, math.floor(param_ratio * in_features * out_features / (in_features + out_features)))


def check_rank(rank: int, in_features: int, out_features: int) -> None:
    if isinstance(rank, bool) or not isinstance(rank, int) or not 0 < rank <= min(in_features, out_features):
        raise ValueError(
            f"rank {rank!r} is not possible for a {in_features}->{out_features} linear: it must be an integer in "
            f"[1, min(in, out) = {min(in_features, out_features)}]; lower rank, or use param_ratio"
        )


def _truncated(W: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(up [out, r], down [r, in])`` of the rank-``r`` truncated SVD, the singular values split evenly."""
    U, S, Vh = torch.linalg.svd(W, full_matrices=False)
    root = S[:rank].sqrt()
    return U[:, :rank] * root, root[:, None] * Vh[:rank]


def _whitening(H: torch.Tensor, damp_percent: float) -> torch.Tensor:
    """Lower Cholesky factor ``L`` of ``H`` (damped by ``damp_percent`` of its mean diagonal, raised 10x at a time
    until it factors)."""
    H = H.double()
    mean_diag = H.diagonal().mean().item()
    if mean_diag <= 0:
        raise ValueError("the calibration activations of this layer are all zero: whitening needs non-zero inputs")
    damp = damp_percent * mean_diag
    for _ in range(6):
        L, info = torch.linalg.cholesky_ex(H + damp * torch.eye(H.shape[0], dtype=H.dtype, device=H.device))
        if info.item() == 0:
            return L
        damp = max(damp * 10, 1e-6 * mean_diag)
    raise ValueError("the calibration Gram matrix is not positive definite even with damping: use more calibration data")


def _to_truncate(
    weight: torch.Tensor, method: str, H: torch.Tensor | None, alpha: float, damp_percent: float
) -> tuple[torch.Tensor, Callable[[torch.Tensor], torch.Tensor]]:
    """``(M, undo)``: the float64 matrix ``method`` truncates (W, W S or W L) and the map from the truncated ``down'``
    back to ``down`` (so that ``up @ undo(down') ~= weight``)."""
    if method not in LOWRANK_METHODS:
        raise ValueError(f"method must be one of {list(LOWRANK_METHODS)}, got {method!r}")
    if weight.dim() != 2:
        raise ValueError(f"factorize expects a 2-D weight [out, in], got shape {tuple(weight.shape)}")
    check_finite(weight)
    W = weight.detach().double()
    if method == "svd":
        return W, lambda down: down
    if H is None:
        raise ValueError(f"method {method!r} needs calibration statistics (the layer's input Gram matrix): pass H")
    check_finite(H, "the calibration activations")
    H = H.to(W.device)
    if method == "asvd":
        # rms(x_j)^alpha; an input that is always zero gets the smallest non-zero scale (its column does not matter)
        rms = H.diagonal().double().clamp(min=0).sqrt()
        floor = rms[rms > 0].min() if bool((rms > 0).any()) else torch.tensor(1.0, dtype=rms.dtype)
        s = rms.clamp(min=floor.item()).pow(alpha)
        return W * s[None, :], lambda down: down / s[None, :]
    L = _whitening(H, damp_percent)
    # down = down' L^-1, i.e. solve down L = down' (L lower triangular)
    return W @ L, lambda down: torch.linalg.solve_triangular(L, down, upper=False, left=False)


def factorize(
    weight: torch.Tensor,
    rank: int,
    method: str = "svd",
    H: torch.Tensor | None = None,
    *,
    alpha: float = 0.5,
    damp_percent: float = 0.01,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(up [out, r], down [r, in])`` in float32 with ``up @ down ~= weight``; ``H`` (the GPTQ Hessian) for asvd/whiten."""
    M, undo = _to_truncate(weight, method, H, alpha, damp_percent)
    check_rank(rank, weight.shape[1], weight.shape[0])
    up, down = _truncated(M, rank)
    # contiguous: SVD's factors are column-major, and the saved (row-major) copy must compute the same bits
    return up.float().contiguous(), undo(down).float().contiguous()


def truncation_spectrum(
    weight: torch.Tensor, method: str = "svd", H: torch.Tensor | None = None, *, alpha: float = 0.5, damp_percent: float = 0.01
) -> torch.Tensor:
    """The squared singular values (float64, largest first) of the matrix ``method`` truncates: rank ``r`` costs
    exactly the sum of those after the first ``r`` in that method's error (the output error, for ``whiten``)."""
    M, _ = _to_truncate(weight, method, H, alpha, damp_percent)
    return torch.linalg.svdvals(M).square()


def allocate_ranks(spectra: dict[str, tuple[torch.Tensor, int, int]], param_ratio: float) -> dict[str, int]:
    """Ranks across layers that keep at most ``param_ratio`` of their weights in total (``sum r (m + n) <= ratio sum m n``)
    and remove the most relative truncation error: ``spectra`` maps each layer to ``(truncation_spectrum, in, out)``.

    Every layer keeps rank 1 at least and at most ``floor(m n / (m + n))`` (beyond it the factors are larger than
    the weight). Then ranks are given one at a time, greatest error removed per parameter first: each layer's next
    singular value, as a fraction of its spectrum's total, over its cost ``m + n``. The gains of one layer fall
    with its rank, so this is the greedy solution of a knapsack with concave gains: exact when the layers cost the
    same per rank, and otherwise within one rank's gain of the best split.
    """
    if not 0 < param_ratio <= 1:
        raise ValueError(f"param_ratio is the fraction of the linear weights kept and must be in (0, 1], got {param_ratio!r}")
    if not spectra:
        raise ValueError("allocate_ranks needs at least one layer")
    names = list(spectra)
    cost = {n: spectra[n][1] + spectra[n][2] for n in names}
    budget = param_ratio * sum(spectra[n][1] * spectra[n][2] for n in names)
    ranks = {n: 1 for n in names}
    used = sum(cost.values())
    if used > budget:
        raise ValueError(
            f"param_ratio {param_ratio} leaves less than rank 1 per layer ({used} parameters needed, {budget:.0f} allowed): "
            "raise param_ratio"
        )
    candidates = []  # (gain per parameter, layer, rank it raises the layer to)
    for i, n in enumerate(names):
        s, in_f, out_f = spectra[n]
        cap = min(rank_for_ratio(in_f, out_f, 1.0), s.numel())
        total = float(s.sum())
        if total <= 0:
            continue
        gains = (s[1:cap].double() / total / cost[n]).tolist()
        candidates += [(g, i, r) for r, g in enumerate(gains, start=2)]
    candidates.sort(key=lambda c: (-c[0], c[1], c[2]))
    closed = set()
    for _, i, r in candidates:
        n = names[i]
        if n in closed:
            continue
        if used + cost[n] > budget:
            closed.add(n)  # its later ranks cost the same and gain less
            continue
        ranks[n] = r
        used += cost[n]
    return ranks
