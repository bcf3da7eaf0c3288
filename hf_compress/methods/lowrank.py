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
    if method not in LOWRANK_METHODS:
        raise ValueError(f"method must be one of {list(LOWRANK_METHODS)}, got {method!r}")
    if weight.dim() != 2:
        raise ValueError(f"factorize expects a 2-D weight [out, in], got shape {tuple(weight.shape)}")
    out_features, in_features = weight.shape
    check_rank(rank, in_features, out_features)
    check_finite(weight)
    W = weight.detach().double()
    if method == "svd":
        up, down = _truncated(W, rank)
        return up.float(), down.float()
    if H is None:
        raise ValueError(f"method {method!r} needs calibration statistics (the layer's input Gram matrix): pass H")
    check_finite(H, "the calibration activations")
    H = H.to(W.device)
    if method == "asvd":
        # rms(x_j)^alpha; an input that is always zero gets the smallest non-zero scale (its column does not matter)
        rms = H.diagonal().double().clamp(min=0).sqrt()
        floor = rms[rms > 0].min() if bool((rms > 0).any()) else torch.tensor(1.0, dtype=rms.dtype)
        s = rms.clamp(min=floor.item()).pow(alpha)
        up, down = _truncated(W * s[None, :], rank)
        return up.float(), (down / s[None, :]).float()
    L = _whitening(H, damp_percent)
    up, down_w = _truncated(W @ L, rank)
    # down = down_w L^-1, i.e. solve down L = down_w (L lower triangular)
    down = torch.linalg.solve_triangular(L, down_w, upper=False, left=False)
    return up.float(), down.float()
