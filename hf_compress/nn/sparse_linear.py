"""``SparseLinear``: a pruned linear layer stored compressed (bitmask + kept values, :mod:`hf_compress.quant.sparse`).

The checkpoint holds ``values`` (the kept weights, row-major) and ``bitmask`` (one bit per weight) where a float
model has ``weight``, so a 50% sparse layer takes about half its dense bytes on disk. The compute form is the
dense weight, rebuilt from them on first use and cached (``cache_dense``): on CPU a pruned layer runs exactly as
fast as the dense one, no faster (no CPU kernel gains from 50% unstructured sparsity at these sizes). On a CUDA
GPU a 2:4 layer in fp16/bf16 runs through PyTorch's semi-structured sparse matmul (sparse tensor cores).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..quant.sparse import compress, densify, unpack_bitmask
from .float_layer import float_layer
from .packed import PackedLayer


class SparseLinear(PackedLayer):
    cache_dense = True  # keep the dense compute weight between calls (False: rebuild it per call, less memory)

    def __init__(
        self,
        in_features: int,
        out_features: int,
        kept: int,
        bias: bool = True,
        dtype: torch.dtype = torch.float32,
        device=None,
        source_is_conv1d: bool = False,
        pattern: tuple[int, int] | None = None,
    ):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.source_is_conv1d = source_is_conv1d
        self.pattern = tuple(pattern) if pattern is not None else None
        self.register_buffer("values", torch.zeros(kept, dtype=dtype, device=device))
        self.register_buffer("bitmask", torch.zeros(out_features, -(-in_features // 8), dtype=torch.uint8, device=device))
        self.bias = nn.Parameter(torch.zeros(out_features, dtype=dtype, device=device), requires_grad=False) if bias else None

    def extra_repr(self) -> str:
        kept = self.values.numel() / max(1, self.in_features * self.out_features)
        target = f"pattern={self.pattern[0]}:{self.pattern[1]}" if self.pattern else f"sparsity={1 - kept:.3f}"
        return f"in_features={self.in_features}, out_features={self.out_features}, {target}, bias={self.bias is not None}"

    # -- state ---------------------------------------------------------------------------------------
    def __getattr__(self, name: str):
        # Generic code that reads ``layer.weight`` for its device and dtype (PEFT does, to place an adapter) gets
        # the kept values; the float weight itself exists only as the quantize-on-load placeholder.
        if name == "weight" and "weight" not in self.__dict__.get("_parameters", {}):
            return self._buffers["values"]
        return super().__getattr__(name)

    def add_weight_placeholder(self) -> None:
        """A meta ``weight`` so a float checkpoint's key finds this module while pruning on load."""
        self._parameters["weight"] = nn.Parameter(torch.empty(self.out_features, self.in_features, device="meta"), requires_grad=False)

    def drop_weight_placeholder(self) -> None:
        self._parameters.pop("weight", None)

    def load_sparse(self, weight: torch.Tensor, mask: torch.Tensor, bias: torch.Tensor | None = None) -> None:
        """Store ``weight [out, in]`` under keep-``mask`` (dropping any placeholder)."""
        self._parameters.pop("weight", None)
        values, bitmask = compress(weight.detach().to(self.values.dtype), mask)
        self._buffers["values"], self._buffers["bitmask"] = values, bitmask
        if bias is not None:
            dtype = self.bias.dtype if self.bias is not None else weight.dtype
            self.bias = nn.Parameter(bias.detach().to(dtype), requires_grad=False)
        self.invalidate_kernel_cache()

    def mask(self) -> torch.Tensor:
        """The keep-mask ``[out, in]``."""
        return unpack_bitmask(self.bitmask, self.in_features)

    def dequantize_weight(self) -> torch.Tensor:
        """The dense weight ``[out, in]`` (zeros where pruned)."""
        return densify(self.values, self.bitmask, self.in_features)

    @torch.no_grad()
    def requantize_(self, weight: torch.Tensor) -> None:
        """Store ``weight [out, in]`` under this layer's own mask: a merged update keeps the sparsity pattern."""
        self.load_sparse(weight, self.mask())

    def to_float(self) -> nn.Module:
        return float_layer(self.dequantize_weight(), self.bias.detach() if self.bias is not None else None, self.source_is_conv1d)

    # -- forward ---------------------------------------------------------------------------------------
    def forward_reference(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.dequantize_weight().to(x.dtype), None if self.bias is None else self.bias.to(x.dtype))

    def _compute_weight(self, x: torch.Tensor):
        key = (x.device, x.dtype)
        w = self._kernel_cache.get(key)
        if w is None:
            # a normal tensor even when first built under inference_mode, so later autograd calls can use it
            with torch.inference_mode(False), torch.no_grad():
                w = self.dequantize_weight().to(x.dtype)
            if self.pattern == (2, 4) and x.is_cuda and x.dtype in (torch.float16, torch.bfloat16):
                from torch.sparse import to_sparse_semi_structured

                w = to_sparse_semi_structured(w)
            if self.cache_dense:
                self._kernel_cache = {key: w}
        return w

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self._compute_weight(x)
        bias = None if self.bias is None else self.bias.to(x.dtype)
        if type(w) is not torch.Tensor:  # a SparseSemiStructuredTensor
            # semi-structured sparse weights take 2-D inputs whose row count is a multiple of the tile
            shape = x.shape
            x2 = x.reshape(-1, shape[-1])
            rows = x2.shape[0]
            pad = -rows % 32
            if pad:
                x2 = F.pad(x2, (0, 0, 0, pad))
            y = F.linear(x2, w, bias)[:rows]
            return y.reshape(*shape[:-1], self.out_features)
        return F.linear(x, w, bias)
