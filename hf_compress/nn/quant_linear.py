"""``QuantLinear``: a weight-only quantized linear layer holding packed 2/3/4/8-bit weights.

It deliberately does not subclass ``nn.Linear``: generic code (PEFT included) must never mistake it for a
float layer. Its state is the packed GPTQ layout (see :mod:`hf_compress.quant.layout`) plus an optional
float bias, so a checkpoint holds ``qweight``/``qzeros``/``scales``/``g_idx`` where a float model has
``weight``: loading one without the plugin reports every weight missing instead of running on raw codes.
"""

from __future__ import annotations

import torch
from torch import nn

from .. import kernels
from ..quant.layout import QuantizedWeight, packed_shapes
from .float_layer import float_layer
from .packed import PackedLayer


class QuantLinear(PackedLayer):
    def __init__(
        self,
        in_features: int,
        out_features: int,
        bits: int,
        group_size: int = -1,
        bias: bool = True,
        dtype: torch.dtype = torch.float32,
        device=None,
        source_is_conv1d: bool = False,
        scale_dtype: torch.dtype | None = None,
    ):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.bits, self.group_size = bits, group_size
        # GPT-2's Conv1D stores weight as [in, out]; remembered so dequantize() restores the original class.
        self.source_is_conv1d = source_is_conv1d
        for name, shape in packed_shapes(in_features, out_features, bits, group_size).items():
            dt = (scale_dtype or dtype) if name == "scales" else torch.int32
            self.register_buffer(name, torch.zeros(shape, dtype=dt, device=device))
        self.bias = nn.Parameter(torch.zeros(out_features, dtype=dtype, device=device), requires_grad=False) if bias else None

    def extra_repr(self) -> str:
        g = "per-channel" if self.group_size == -1 else f"group_size={self.group_size}"
        return f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}, {g}, bias={self.bias is not None}"

    # -- state ---------------------------------------------------------------------------------------
    def add_weight_placeholder(self) -> None:
        """A meta ``weight`` so a float checkpoint's key finds this module while quantizing on load."""
        self.weight = nn.Parameter(torch.empty(self.out_features, self.in_features, device="meta"), requires_grad=False)

    def drop_weight_placeholder(self) -> None:
        self._parameters.pop("weight", None)

    @property
    def mins(self) -> torch.Tensor | None:
        """Per-group float offsets ``[n_groups, out]`` subtracted after scaling (w = scale·(q − zero) − min), or
        ``None``: how a GGUF k-quant (Q4_K: w = d·sc·q − dmin·m) is held exactly. Set by :meth:`set_mins`."""
        return self._buffers.get("group_mins")

    def set_mins(self, mins: torch.Tensor | None) -> None:
        if mins is not None and tuple(mins.shape) != tuple(self.scales.shape):
            raise ValueError(f"mins must have the scales' shape {tuple(self.scales.shape)}, got {tuple(mins.shape)}")
        self.register_buffer("group_mins", None if mins is None else mins.to(torch.float32).contiguous())
        g = self.scales.shape[0]
        self._contiguous_groups = self.group_size > 0 and self.in_features == g * self.group_size and bool(
            (self.g_idx.long() == torch.arange(self.in_features, device=self.g_idx.device) // self.group_size).all()
        )
        self.invalidate_kernel_cache()

    def _group_sums(self, x: torch.Tensor) -> torch.Tensor:
        """``x [..., in]`` summed over each group's columns: ``[..., n_groups]`` (the input of the mins term)."""
        g = self.scales.shape[0]
        if getattr(self, "_contiguous_groups", False):
            return x.reshape(*x.shape[:-1], g, self.group_size).sum(-1)
        out = x.new_zeros(*x.shape[:-1], g)
        return out.index_add_(-1, self.g_idx.long(), x)

    def _minus_mins(self, y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        m = self.mins
        return y if m is None else y - self._group_sums(x.to(torch.float32)).matmul(m).to(y.dtype)

    def load_quantized(self, qw: QuantizedWeight, bias: torch.Tensor | None = None) -> None:
        """Pack ``qw`` into this module's buffers (dropping any quantize-on-load placeholder)."""
        if (qw.bits, qw.group_size) != (self.bits, self.group_size):
            raise ValueError(f"quantized weight has bits={qw.bits}, group_size={qw.group_size}; layer expects {self.bits}, {self.group_size}")
        self._parameters.pop("weight", None)
        for name, tensor in qw.pack().items():
            setattr(self, name, tensor)
        if bias is not None:
            dtype = self.bias.dtype if self.bias is not None else self.scales.dtype
            self.bias = nn.Parameter(bias.detach().to(dtype), requires_grad=False)
        self.invalidate_kernel_cache()

    def dequantize_weight(self) -> torch.Tensor:
        """The float weight ``[out, in]`` in the dtype of the scales (the vectorised twin of ``dequantize_layout``,
        bit-identical to it)."""
        w = kernels.dequantize(self.qweight, self.qzeros, self.scales, self.g_idx, self.bits, self.in_features)
        m = self.mins
        return w if m is None else (w.to(torch.float32) - m[self.g_idx.long()].t()).to(w.dtype)

    @torch.no_grad()
    def requantize_(self, weight: torch.Tensor) -> None:
        """Store ``weight [out, in]`` rounded onto this layer's own grid (its scales, zero codes and ``g_idx`` stay):
        merging a small update this way moves each weight by at most the update itself."""
        from ..methods.rtn import check_finite, codes_for
        from ..quant.layout import unpack_qzeros

        if self.mins is not None:
            raise ValueError("this layer holds GGUF k-quant mins (loaded by load_gguf): it cannot take a merged update; "
                             "keep the adapter unmerged")
        check_finite(weight)
        zeros = unpack_qzeros(self.qzeros, self.bits, self.out_features).t()
        scales = self.scales.t()
        codes = codes_for(weight.to(self.scales.device), scales, zeros, self.g_idx, self.bits)
        self.load_quantized(QuantizedWeight(codes, scales, zeros, self.g_idx, self.bits, self.group_size))

    def to_float(self) -> nn.Module:
        """An equivalent float layer (``nn.Linear``, or ``Conv1D`` for modules that were GPT-2 Conv1D)."""
        return float_layer(self.dequantize_weight(), self.bias.detach() if self.bias is not None else None, self.source_is_conv1d)

    # -- forward ---------------------------------------------------------------------------------------
    def forward_reference(self, x: torch.Tensor) -> torch.Tensor:
        y = kernels.reference_linear(
            x, self.qweight, self.qzeros, self.scales, self.g_idx, self.bias, self.bits, self.in_features
        )
        return self._minus_mins(y, x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._minus_mins(kernels.quant_linear(x, self), x)
