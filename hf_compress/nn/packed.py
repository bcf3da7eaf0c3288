"""What the packed layers share: a cache of tensors their kernels prepared, dropped whenever the stored tensors
move or change, and their stored size."""

from __future__ import annotations

from torch import nn


class PackedLayer(nn.Module):
    """Base of the layers holding compressed weights (``QuantLinear``, ``Int8Linear``, ``SparseLinear``)."""

    def __init__(self):
        super().__init__()
        self._kernel_cache: dict = {}

    def invalidate_kernel_cache(self) -> None:
        self._kernel_cache = {}

    def _apply(self, fn, recurse=True):
        # Prepared kernel tensors belong to the old device/dtype: rebuild them lazily.
        self.invalidate_kernel_cache()
        return super()._apply(fn, recurse)

    def packed_weight_bytes(self) -> int:
        """Bytes of the stored weight tensors (the layer's own buffers; the bias is not counted)."""
        return sum(t.numel() * t.element_size() for t in self.buffers(recurse=False))
