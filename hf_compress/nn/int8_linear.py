"""Linear layers with int8 weights and int8 activations: ``Int8MixedLinear`` (LLM.int8) and ``W8A8Linear``.

Both store bitsandbytes' 8-bit state: ``weight`` (int8 ``[out, in]``, one row per output channel) and
``SCB`` (float32 ``[out]``, each row's absmax; the weight is ``weight * SCB / 127``), plus a float bias.
``W8A8Linear`` may add ``input_scale`` (a static per-tensor activation scale, 0-d float32) and ``smooth``
(SmoothQuant's per-input-channel divisor ``[in]``: the stored weight is ``W * smooth`` and activations are
multiplied by ``1 / smooth`` before quantization). See :mod:`hf_compress.quant.int8` for the math.

Like ``QuantLinear`` they do not subclass ``nn.Linear``, so generic code never mistakes them for float layers.
"""

from __future__ import annotations

import torch
from torch import nn

from .. import kernels
from ..quant.int8 import INT8_MAX, absmax_rows, check_finite, int8_linear_reference, quantize_rows
from .float_layer import float_layer
from .packed import PackedLayer

ACT_GRANULARITIES = ("per-token", "per-tensor")


class Int8Linear(PackedLayer):
    """Shared state and methods of the int8 weight layers; subclasses say how activations are quantized."""

    threshold: float | None = None

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        dtype: torch.dtype = torch.float32,
        device=None,
        source_is_conv1d: bool = False,
    ):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.source_is_conv1d = source_is_conv1d
        self.register_buffer("weight", torch.zeros(out_features, in_features, dtype=torch.int8, device=device))
        self.register_buffer("SCB", torch.zeros(out_features, dtype=torch.float32, device=device))
        self.bias = nn.Parameter(torch.zeros(out_features, dtype=dtype, device=device), requires_grad=False) if bias else None

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"

    # -- state ---------------------------------------------------------------------------------------
    def add_weight_placeholder(self) -> None:
        """A meta float ``weight`` parameter so a float checkpoint's key finds this module while quantizing on load."""
        del self._buffers["weight"]
        self.weight = nn.Parameter(torch.empty(self.out_features, self.in_features, device="meta"), requires_grad=False)

    def drop_weight_placeholder(self) -> None:
        """Back to an int8 ``weight`` buffer (on meta until the quantized tensors are assigned)."""
        if isinstance(self._parameters.pop("weight", None), nn.Parameter):
            self.register_buffer("weight", torch.empty(self.out_features, self.in_features, dtype=torch.int8, device="meta"))

    def quantize_weight(self, weight: torch.Tensor) -> dict[str, torch.Tensor]:
        """The int8 state for a float weight ``[out, in]`` (of this layer's input space: smoothing already applied)."""
        check_finite(weight, "the weight")
        codes, _ = quantize_rows(weight)
        return {"weight": codes, "SCB": absmax_rows(weight)}

    def load_float_weight(self, weight: torch.Tensor, bias: torch.Tensor | None = None) -> None:
        """Quantize and store ``weight [out, in]`` (dropping any quantize-on-load placeholder)."""
        state = self.quantize_weight(weight)
        self._parameters.pop("weight", None)
        for name, tensor in state.items():
            self._buffers[name] = tensor.to(weight.device)
        if bias is not None:
            dtype = self.bias.dtype if self.bias is not None else weight.dtype
            self.bias = nn.Parameter(bias.detach().to(dtype), requires_grad=False)
        self.invalidate_kernel_cache()

    _FLOAT32_BUFFERS = ("SCB", "input_scale", "smooth")

    def _apply(self, fn, recurse=True):
        # model.to(dtype) must not round the scales: they follow the device, never the dtype.
        self.invalidate_kernel_cache()
        kept = {n: self._buffers.pop(n) for n in self._FLOAT32_BUFFERS if self._buffers.get(n) is not None}
        out = super()._apply(fn, recurse)
        for n, t in kept.items():
            moved = fn(t)
            self._buffers[n] = moved if moved.dtype == t.dtype else t.to(moved.device)
        return out

    @property
    def weight_scale(self) -> torch.Tensor:
        """Per-output-row scale ``SCB / 127`` (float32); rows of zeros get 1, as when quantizing."""
        scb = self.SCB.float()
        return torch.where(scb > 0, scb / INT8_MAX, torch.ones_like(scb))

    @property
    def smooth_divisor(self) -> torch.Tensor | None:
        return None

    @property
    def static_scale(self) -> torch.Tensor | None:
        return None

    per_tensor = False

    def dequantize_weight(self) -> torch.Tensor:
        """The float32 weight ``[out, in]`` the layer multiplies by (before activation quantization)."""
        w = self.weight.float() * self.weight_scale.unsqueeze(1)
        smooth = self.smooth_divisor
        return w if smooth is None else w * (1.0 / smooth.float())

    @torch.no_grad()
    def requantize_(self, weight: torch.Tensor) -> None:
        """Store ``weight [out, in]`` (the space :meth:`dequantize_weight` returns) rounded onto this layer's own
        per-row scales (``SCB`` and any smoothing stay)."""
        check_finite(weight, "the weight")
        w = weight.float().to(self.SCB.device)
        smooth = self.smooth_divisor
        if smooth is not None:
            w = w * smooth.float()
        codes = torch.round(w / self.weight_scale.unsqueeze(1)).clamp_(-INT8_MAX, INT8_MAX).to(torch.int8)
        self._buffers["weight"] = codes
        self.invalidate_kernel_cache()

    def to_float(self, dtype: torch.dtype | None = None) -> nn.Module:
        """An equivalent float layer (``nn.Linear``, or ``Conv1D`` for modules that were GPT-2 Conv1D)."""
        dtype = dtype or (self.bias.dtype if self.bias is not None else torch.float32)
        bias = self.bias.detach().to(dtype) if self.bias is not None else None
        return float_layer(self.dequantize_weight().to(dtype), bias, self.source_is_conv1d)

    # -- forward ---------------------------------------------------------------------------------------
    def forward_reference(self, x: torch.Tensor) -> torch.Tensor:
        return int8_linear_reference(
            x,
            self.weight,
            self.weight_scale,
            self.bias,
            act_scale=self.static_scale,
            per_tensor=self.per_tensor,
            smooth=self.smooth_divisor,
            threshold=self.threshold,
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return kernels.int8_linear(x, self)


class Int8MixedLinear(Int8Linear):
    """LLM.int8 (Dettmers et al. 2022): int8 weights; activations quantized per token at run time, except the
    outlier input features (columns where any ``|x| >= threshold`` in the current batch), which multiply the
    dequantized weight columns in float; the two sums are added."""

    def __init__(self, in_features: int, out_features: int, threshold: float = 6.0, **kwargs):
        super().__init__(in_features, out_features, **kwargs)
        if not isinstance(threshold, (int, float)) or isinstance(threshold, bool) or not threshold > 0:
            raise ValueError(
                f"threshold must be > 0 (the outlier magnitude, 6.0 in LLM.int8), got {threshold!r}; "
                "for int8 activations without outlier handling use W8A8Linear / W8A8Config"
            )
        self.threshold = float(threshold)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, threshold={self.threshold}"


class W8A8Linear(Int8Linear):
    """Int8 weights and int8 activations: dynamic (per token or per tensor, scales at run time) or static
    (``input_scale`` fixed from calibration), optionally SmoothQuant-smoothed (``smooth``)."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        act_granularity: str = "per-token",
        static: bool = False,
        smooth: bool = False,
        **kwargs,
    ):
        super().__init__(in_features, out_features, **kwargs)
        if act_granularity not in ACT_GRANULARITIES:
            raise ValueError(f"act_granularity must be one of {list(ACT_GRANULARITIES)}, got {act_granularity!r}")
        if static and act_granularity != "per-tensor":
            raise ValueError("static activation scales are per tensor: use act_granularity='per-tensor' with static=True")
        self.act_granularity = act_granularity
        self.per_tensor = act_granularity == "per-tensor"
        device = self.SCB.device
        if static:
            self.register_buffer("input_scale", torch.ones((), dtype=torch.float32, device=device))
        if smooth:
            self.register_buffer("smooth", torch.ones(in_features, dtype=torch.float32, device=device))

    def extra_repr(self) -> str:
        mode = "static" if "input_scale" in self._buffers else "dynamic"
        s = ", smooth" if "smooth" in self._buffers else ""
        return f"{super().extra_repr()}, activations={mode} {self.act_granularity}{s}"

    @property
    def smooth_divisor(self) -> torch.Tensor | None:
        return self._buffers.get("smooth")

    @property
    def static_scale(self) -> torch.Tensor | None:
        return self._buffers.get("input_scale")
