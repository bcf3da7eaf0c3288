"""Sparsity masks and the compressed sparse layout (pure tensor math, no transformers import).

Masks are boolean ``[out, in]`` tensors, True where a weight is **kept**. Two targets:

- unstructured: a fraction ``sparsity`` of the weights removed, the lowest-scoring ``int(in * sparsity)`` of
  each output row (:func:`row_mask`);
- N:M (semi-structured): at most ``N`` weights kept in every ``M`` consecutive inputs of a row, NVIDIA's
  convention, so ``2:4`` is 50% sparse and runs on sparse tensor cores (:func:`nm_mask`).

The stored layout is a bitmask (one bit per weight, packed 8 to a byte along the input dimension, low bit
first) plus the kept values in row-major order: a 50% sparse fp32 matrix takes 0.53x its dense bytes.
"""

from __future__ import annotations

import torch

__all__ = [
    "check_pattern",
    "check_sparsity",
    "compress",
    "densify",
    "nm_mask",
    "pack_bitmask",
    "parse_pattern",
    "row_mask",
    "select_mask",
    "unpack_bitmask",
]


def check_sparsity(sparsity) -> None:
    if isinstance(sparsity, bool) or not isinstance(sparsity, (int, float)) or not 0 <= sparsity < 1:
        raise ValueError(
            f"sparsity is the fraction of weights removed and must be in [0, 1), got {sparsity!r} (0.5 removes half)"
        )


def parse_pattern(pattern) -> tuple[int, int]:
    """``"2:4"`` (or ``(2, 4)``) -> ``(2, 4)``: at most N kept in every M consecutive inputs."""
    if isinstance(pattern, str):
        parts = pattern.split(":")
        try:
            n, m = (int(p) for p in parts) if len(parts) == 2 else (None, None)
        except ValueError:
            n, m = None, None
    elif isinstance(pattern, (tuple, list)) and len(pattern) == 2:
        n, m = pattern
    else:
        n, m = None, None
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in (n, m)):
        raise ValueError(f"pattern must be 'N:M' (e.g. '2:4': at most N weights kept in every M), got {pattern!r}")
    check_pattern(n, m)
    return n, m


def check_pattern(n: int, m: int, in_features: int | None = None) -> None:
    if not 0 < n < m:
        raise ValueError(
            f"N:M pattern {n}:{m} must keep 0 < N < M weights of every M (N >= M prunes nothing): use e.g. 2:4 or 4:8"
        )
    if in_features is not None and in_features % m:
        raise ValueError(
            f"an input width of {in_features} is not a multiple of M={m}, so {n}:{m} groups do not tile it: "
            f"choose an M that divides {in_features}, or keep this layer dense (modules_to_not_convert)"
        )


def row_mask(scores: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Keep-mask removing the ``int(in * sparsity)`` lowest scores of each row (ties: the lower index goes)."""
    check_sparsity(sparsity)
    out, n = scores.shape
    k = int(n * sparsity)
    mask = torch.ones(out, n, dtype=torch.bool, device=scores.device)
    if k:
        # a stable sort keeps ties in index order on every device: the same scores give the same mask
        idx = torch.sort(scores.float(), dim=1, stable=True).indices[:, :k]
        mask.scatter_(1, idx, False)
    return mask


def nm_mask(scores: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Keep-mask keeping the ``n`` highest scores in every ``m`` consecutive inputs of each row."""
    out, width = scores.shape
    check_pattern(n, m, width)
    s = scores.float().reshape(out, width // m, m)
    idx = torch.sort(s, dim=2, stable=True, descending=True).indices[..., :n]
    mask = torch.zeros_like(s, dtype=torch.bool).scatter_(2, idx, True)
    return mask.reshape(out, width)


def select_mask(scores: torch.Tensor, sparsity: float | None = None, pattern: tuple[int, int] | None = None) -> torch.Tensor:
    """The keep-mask for a target: ``pattern`` (N, M) if given, else ``sparsity`` per row."""
    if pattern is not None:
        return nm_mask(scores, *pattern)
    return row_mask(scores, 0.0 if sparsity is None else sparsity)


def pack_bitmask(mask: torch.Tensor) -> torch.Tensor:
    """``[out, in]`` bool -> ``[out, ceil(in / 8)]`` uint8, input ``8j + b`` in bit ``b`` of byte ``j``."""
    out, n = mask.shape
    pad = -n % 8
    bits = torch.nn.functional.pad(mask.to(torch.uint8), (0, pad)).reshape(out, -1, 8)
    weights = torch.tensor([1 << b for b in range(8)], dtype=torch.uint8, device=mask.device)
    return (bits * weights).sum(-1, dtype=torch.uint8)


def unpack_bitmask(packed: torch.Tensor, in_features: int) -> torch.Tensor:
    """Inverse of :func:`pack_bitmask`."""
    out, nbytes = packed.shape
    if nbytes * 8 < in_features or nbytes != -(-in_features // 8):
        raise ValueError(f"a bitmask of {nbytes} bytes per row does not fit {in_features} input features")
    shifts = torch.arange(8, dtype=torch.uint8, device=packed.device)
    bits = (packed.unsqueeze(-1) >> shifts) & 1
    return bits.reshape(out, nbytes * 8)[:, :in_features].bool()


def compress(weight: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(kept values in row-major order, packed bitmask)`` of ``weight [out, in]`` under keep-``mask``."""
    if weight.shape != mask.shape:
        raise ValueError(f"mask shape {tuple(mask.shape)} does not match weight shape {tuple(weight.shape)}")
    return weight[mask].contiguous(), pack_bitmask(mask)


def densify(values: torch.Tensor, bitmask: torch.Tensor, in_features: int) -> torch.Tensor:
    """The dense ``[out, in]`` weight (zeros where pruned) from :func:`compress`'s output."""
    mask = unpack_bitmask(bitmask, in_features)
    kept = int(mask.sum())
    if kept != values.numel():
        raise ValueError(
            f"the bitmask keeps {kept} weights but {values.numel()} values are stored: the checkpoint is corrupt or "
            "its tensors come from different layers"
        )
    dense = torch.zeros(mask.shape, dtype=values.dtype, device=values.device)
    dense[mask] = values
    return dense
