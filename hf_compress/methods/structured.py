"""Importance scores and selections for structured pruning (whole MLP channels, key/value head groups, blocks).

Scores come from calibration activations, accumulated by :class:`ChannelStats` over the tokens a hook sees:

- ``activation``: the L2 norm of each channel's activation over the calibration tokens (Minitron's width score);
- ``taylor``: first-order Taylor, ``|sum_t h_tj * dL/dh_tj|`` (the loss change when channel j is zeroed);
- depth: ``1 - cos(block input, block output)`` averaged over tokens (ShortGPT's block influence): the blocks
  that change their input least go first.
"""

from __future__ import annotations

import torch

IMPORTANCE = ("activation", "taylor")


class ChannelStats:
    """Per-channel sums over calibration tokens: squared activations and activation x gradient."""

    def __init__(self, channels: int, device=None):
        self.sq = torch.zeros(channels, dtype=torch.float64, device=device)
        self.taylor = torch.zeros(channels, dtype=torch.float64, device=device)
        self.sum = torch.zeros(channels, dtype=torch.float64, device=device)
        self.tokens = 0

    def add(self, h: torch.Tensor) -> None:
        h = h.detach().reshape(-1, h.shape[-1]).to(self.sq.device, torch.float64)
        self.sq += h.square().sum(0)
        self.sum += h.sum(0)
        self.tokens += h.shape[0]

    def add_grad(self, h: torch.Tensor, g: torch.Tensor) -> None:
        self.taylor += (h.detach().double() * g.detach().double()).reshape(-1, h.shape[-1]).sum(0).to(self.taylor.device)

    def scores(self, importance: str) -> torch.Tensor:
        if self.tokens == 0:
            raise ValueError("no calibration tokens reached this layer: pass calibration data")
        if importance == "activation":
            return self.sq.sqrt()
        if importance == "taylor":
            return self.taylor.abs()
        raise ValueError(f"importance must be one of {list(IMPORTANCE)}, got {importance!r}")

    def mean(self) -> torch.Tensor:
        return self.sum / max(1, self.tokens)


def keep_top(scores: torch.Tensor, keep: int) -> torch.Tensor:
    """Indices of the ``keep`` highest scores, in increasing index order (so kept channels stay in place)."""
    if not 0 < keep <= scores.numel():
        raise ValueError(f"cannot keep {keep} of {scores.numel()} channels")
    idx = torch.sort(scores.double(), descending=True, stable=True).indices[:keep]
    return idx.sort().values


def group_scores(scores: torch.Tensor, groups: int) -> torch.Tensor:
    """Scores of ``groups`` equal consecutive groups: the L2 norm of their members' scores."""
    return scores.reshape(groups, -1).square().sum(1).sqrt()


def blocks_to_drop(similarity: torch.Tensor, n: int) -> list[int]:
    """The ``n`` blocks whose output is most similar to their input (highest mean cosine), sorted."""
    if not 0 <= n < similarity.numel():
        raise ValueError(f"cannot drop {n} of {similarity.numel()} blocks: at least one must stay")
    return sorted(torch.sort(similarity.double(), descending=True, stable=True).indices[:n].tolist())
