"""Layers that hold GGUF block bytes as they lie in the file (``load_gguf`` uses them for the types our packed
layouts do not hold exactly: Q5_0, Q5_1, Q5_K, Q6_K, and for token embeddings of any type).

The weight is dequantized when used: a linear dequantizes its whole matrix per call, an embedding only the rows it
looks up (GGUF blocks run along a row, so a row decodes on its own). Memory is the file's bytes.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..quant.gguf_blocks import dequantize, row_bytes
from .packed import PackedLayer


class _GGUFBlocks(PackedLayer):
    def __init__(self, rows: int, cols: int, qtype: str, device=None):
        super().__init__()
        self.rows, self.cols, self.qtype = rows, cols, qtype
        self.register_buffer("blocks", torch.zeros(rows, row_bytes(qtype, cols), dtype=torch.uint8, device=device))

    def load_blocks(self, blocks: torch.Tensor) -> None:
        if tuple(blocks.shape) != tuple(self.blocks.shape):
            raise ValueError(f"{self.qtype} blocks of shape {tuple(blocks.shape)} do not fit a [{self.rows}, {self.cols}] weight")
        self.blocks = blocks.to(torch.uint8).contiguous()

    def dequantize_weight(self) -> torch.Tensor:
        """float32 ``[rows, cols]``."""
        return dequantize(self.blocks, self.qtype, self.cols)


class GGUFLinear(_GGUFBlocks):
    """``y = x Wᵀ + b`` with W kept as GGUF blocks ``[out, row_bytes]``."""

    def __init__(self, in_features: int, out_features: int, qtype: str, bias: bool = False, device=None):
        super().__init__(out_features, in_features, qtype, device)
        self.in_features, self.out_features = in_features, out_features
        self.bias = torch.nn.Parameter(torch.zeros(out_features, device=device), requires_grad=False) if bias else None

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, qtype={self.qtype}, bias={self.bias is not None}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return F.linear(x, self.dequantize_weight().to(x.dtype), bias)

    def to_float(self) -> torch.nn.Linear:
        lin = torch.nn.Linear(self.in_features, self.out_features, bias=self.bias is not None)
        with torch.no_grad():
            lin.weight.copy_(self.dequantize_weight())
            if self.bias is not None:
                lin.bias.copy_(self.bias)
        return lin


class GGUFEmbedding(_GGUFBlocks):
    """An embedding table kept as GGUF blocks ``[num_embeddings, row_bytes]``; a lookup decodes only its rows."""

    def __init__(self, num_embeddings: int, embedding_dim: int, qtype: str, padding_idx: int | None = None, device=None):
        super().__init__(num_embeddings, embedding_dim, qtype, device)
        self.num_embeddings, self.embedding_dim, self.padding_idx = num_embeddings, embedding_dim, padding_idx
        self.compute_dtype = torch.float32

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, qtype={self.qtype}"

    @property
    def weight(self) -> torch.Tensor:
        """The dequantized table (for code that reads ``embed_tokens.weight``, e.g. tying checks)."""
        return self.dequantize_weight().to(self.compute_dtype)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        rows = self.blocks.index_select(0, ids.reshape(-1))
        return dequantize(rows, self.qtype, self.cols).reshape(*ids.shape, self.cols).to(self.compute_dtype)

    def to_float(self) -> torch.nn.Embedding:
        return torch.nn.Embedding.from_pretrained(self.dequantize_weight(), freeze=False, padding_idx=self.padding_idx)
