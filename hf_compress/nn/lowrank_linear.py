"""``LowRankLinear``: ``y = up(down(x)) + bias``, two thin matmuls in place of one ``[out, in]`` weight.

``down`` (in -> r) and ``up`` (r -> out) are plain ``nn.Linear`` layers without bias, or packed
:class:`~hf_compress.nn.quant_linear.QuantLinear` layers when the factors are quantized too, so a checkpoint
holds ``<layer>.down.weight``, ``<layer>.up.weight`` and ``<layer>.bias`` (or the factors' packed tensors).
"""

from __future__ import annotations

import torch
from torch import nn

from .float_layer import float_layer


class LowRankLinear(nn.Module):
    def __init__(
        self,
        in_features: int,
        out_features: int,
        rank: int,
        bias: bool = True,
        dtype: torch.dtype = torch.float32,
        device=None,
        source_is_conv1d: bool = False,
        down: nn.Module | None = None,
        up: nn.Module | None = None,
    ):
        super().__init__()
        self.in_features, self.out_features, self.rank = in_features, out_features, rank
        self.source_is_conv1d = source_is_conv1d
        self.down = down if down is not None else nn.Linear(in_features, rank, bias=False, dtype=dtype, device=device)
        self.up = up if up is not None else nn.Linear(rank, out_features, bias=False, dtype=dtype, device=device)
        for factor in (self.down, self.up):
            for p in factor.parameters():
                p.requires_grad_(False)
        self.bias = nn.Parameter(torch.zeros(out_features, dtype=dtype, device=device), requires_grad=False) if bias else None

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}, bias={self.bias is not None}"

    # -- state ---------------------------------------------------------------------------------------
    def add_weight_placeholder(self) -> None:
        """A meta ``weight`` so a float checkpoint's key finds this module while factorising on load."""
        self._parameters["weight"] = nn.Parameter(torch.empty(self.out_features, self.in_features, device="meta"), requires_grad=False)

    def drop_weight_placeholder(self) -> None:
        self._parameters.pop("weight", None)

    @staticmethod
    def factor_weight(factor: nn.Module) -> torch.Tensor:
        return factor.dequantize_weight() if hasattr(factor, "dequantize_weight") else factor.weight

    def load_factors(self, up: torch.Tensor, down: torch.Tensor, bias: torch.Tensor | None = None) -> None:
        """Store float factors ``up [out, r]`` and ``down [r, in]`` (dropping any placeholder)."""
        self._parameters.pop("weight", None)
        if (tuple(up.shape), tuple(down.shape)) != ((self.out_features, self.rank), (self.rank, self.in_features)):
            raise ValueError(f"factors {tuple(up.shape)} @ {tuple(down.shape)} do not fit a rank-{self.rank} "
                             f"{self.in_features}->{self.out_features} layer")
        dtype = self.bias.dtype if self.bias is not None else up.dtype
        self.up.weight = nn.Parameter(up.detach().to(dtype), requires_grad=False)
        self.down.weight = nn.Parameter(down.detach().to(dtype), requires_grad=False)
        if bias is not None:
            self.bias = nn.Parameter(bias.detach().to(dtype), requires_grad=False)

    def packed_weight_bytes(self) -> int:
        total = 0
        for factor in (self.down, self.up):
            packed = getattr(factor, "packed_weight_bytes", None)
            total += packed() if callable(packed) else factor.weight.numel() * factor.weight.element_size()
        return total

    def dequantize_weight(self) -> torch.Tensor:
        """The dense weight ``up @ down`` ``[out, in]``."""
        up, down = self.factor_weight(self.up), self.factor_weight(self.down)
        return (up.float() @ down.float()).to(up.dtype)

    def to_float(self) -> nn.Module:
        return float_layer(self.dequantize_weight(), self.bias.detach() if self.bias is not None else None, self.source_is_conv1d)

    # -- forward ---------------------------------------------------------------------------------------
    def forward_reference(self, x: torch.Tensor) -> torch.Tensor:
        y = x @ self.dequantize_weight().to(x.dtype).t()
        return y if self.bias is None else y + self.bias.to(x.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.up(self.down(x))
        return y if self.bias is None else y + self.bias.to(y.dtype)
