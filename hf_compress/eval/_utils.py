"""Small helpers shared by the eval modules."""

from __future__ import annotations

import contextlib

import torch
from torch import nn


def model_device(model: nn.Module) -> torch.device:
    """The device inputs should go to: ``model.device`` for HF models, else the first parameter/buffer's."""
    dev = getattr(model, "device", None)
    if isinstance(dev, torch.device):
        return dev
    for t in model.parameters():
        return t.device
    for t in model.buffers():
        return t.device
    return torch.device("cpu")


@contextlib.contextmanager
def eval_mode(model: nn.Module):
    """Put ``model`` in eval mode (no dropout) for the block and restore its training flag afterwards."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        if was_training:
            model.train()


def synchronize(device: torch.device) -> None:
    """Wait for queued work on an accelerator (no-op on CPU)."""
    if device.type == "cpu":
        return
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        return
    acc = getattr(torch, "accelerator", None)
    if acc is not None and hasattr(acc, "synchronize"):
        acc.synchronize()
        return
    mod = getattr(torch, device.type, None)
    if mod is not None and hasattr(mod, "synchronize"):
        mod.synchronize()


def max_positions(config) -> int | None:
    """The longest sequence the model's position encoding supports, if its config says."""
    for attr in ("max_position_embeddings", "n_positions", "max_seq_len", "seq_length", "n_ctx"):
        v = getattr(config, attr, None)
        if isinstance(v, int) and v > 0:
            return v
    return None


def accepts_kwarg(model: nn.Module, name: str) -> bool:
    """Whether ``model.forward`` takes keyword ``name`` by name (not just via ``**kwargs``)."""
    import inspect

    try:
        params = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return False
    return name in params
