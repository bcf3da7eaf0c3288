"""Finding and swapping the linear layers of a transformers model (``nn.Linear`` and GPT-2's ``Conv1D``)."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D
from transformers.quantizers.quantizers_utils import should_convert_module
from transformers.utils import logging

logger = logging.get_logger(__name__)


def linear_shape(module: nn.Module) -> tuple[int, int] | None:
    """``(in_features, out_features)`` of a float linear-like module, else None."""
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features
    if isinstance(module, Conv1D):
        return module.weight.shape[0], module.nf
    return None


def float_weight(module: nn.Module, weight: torch.Tensor | None = None) -> torch.Tensor:
    """The weight as ``[out, in]`` (Conv1D stores ``[in, out]``)."""
    w = module.weight if weight is None else weight
    return w.t() if isinstance(module, Conv1D) else w


def iter_linears(model: nn.Module, skip: list[str] | None = None) -> Iterator[tuple[str, nn.Module]]:
    for name, module in model.named_modules():
        if linear_shape(module) is not None and should_convert_module(name, skip):
            yield name, module


def set_submodule(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def replace_linears(model: nn.Module, make: Callable[[str, nn.Module], nn.Module], skip: list[str] | None = None) -> list[str]:
    """Replace every convertible linear by ``make(name, module)``; returns the replaced names."""
    replaced = []
    for name, module in list(iter_linears(model, skip)):
        set_submodule(model, name, make(name, module))
        replaced.append(name)
    return replaced


def report_coverage(model: nn.Module, replaced: list[str], quantized_numel: int) -> float:
    """Warn about weights that stay float because they are not linear layers (e.g. 3-D MoE experts)."""
    expert_numel = sum(p.numel() for n, p in model.named_parameters() if p.dim() == 3 and "expert" in n)
    if expert_numel:
        fraction = quantized_numel / (quantized_numel + expert_numel)
        logger.warning(
            f"{expert_numel:,} mixture-of-experts weights are stored as 3-D parameters, not linear layers, and stay "
            f"unquantized: {fraction:.1%} of the linear and expert weights are quantized."
        )
        return fraction
    return 1.0
