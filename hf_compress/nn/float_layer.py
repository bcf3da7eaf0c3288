"""The float layer a compressed layer dequantizes to: ``nn.Linear``, or ``Conv1D`` for GPT-2's layers."""

from __future__ import annotations

import torch
from torch import nn


def float_layer(weight: torch.Tensor, bias: torch.Tensor | None, source_is_conv1d: bool) -> nn.Module:
    """A float layer holding ``weight`` ``[out, in]`` (and ``bias``) in their dtype and device; ``Conv1D``
    (which stores ``[in, out]`` and always has a bias) when the compressed layer replaced one."""
    out_features, in_features = weight.shape
    if source_is_conv1d:
        from transformers.pytorch_utils import Conv1D

        layer = Conv1D(out_features, in_features)
        layer.weight = nn.Parameter(weight.t().contiguous())
        layer.bias = nn.Parameter(bias if bias is not None else torch.zeros(out_features, dtype=weight.dtype))
        return layer.to(weight.device)
    layer = nn.Linear(in_features, out_features, bias=bias is not None, device=weight.device, dtype=weight.dtype)
    layer.weight = nn.Parameter(weight)
    if bias is not None:
        layer.bias = nn.Parameter(bias)
    return layer
