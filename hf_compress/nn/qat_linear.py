"""``FakeQuantLinear``: the quantization-aware training layer (weights, optionally int8 activations).

It keeps the float ``weight`` as a trainable latent weight and, in every forward, rounds it onto the grid of the
packed layer it will become (straight-through, :func:`~hf_compress.quant.fake.fake_quantize_ste`):

- ``target="layout"`` (weight-only, 2/3/4/8 bits): the packed GPTQ layout of :class:`QuantLinear`, unsigned codes
  ``[0, 2**bits - 1]``, per-group ``weight_scale`` and zero codes ``weight_zero`` ``[out, n_groups]`` (zero fixed
  at ``2**(bits-1)`` when symmetric).
- ``target="int8"`` (with int8 activations): :class:`W8A8Linear`'s grid, signed codes ``[-127, 127]``, one scale
  per output row; activations fake-quantized per token at run time (``act="dynamic"``) or with one learned scale
  (``act="static"``, initialised from the first batch it sees).

A scale is the observer's value (buffer ``weight_scale_base``, ``input_scale_base``) times ``exp`` of a learned
log-ratio (``weight_log_scale``, ``input_log_scale``, starting at 0 so the start is the observer's grid exactly): an
optimizer step then changes a scale by the same relative amount at any bit width (a direct 8-bit scale of ~1e-3 turns
negative after one Adam step at learning rate 1e-3). Zero codes train in code units (``weight_zero``). With
``learn_scales`` they train (LSQ / LSQ+ gradients through the rounding), otherwise they stay as the observer set them. :meth:`to_quantized` gives
the packed layer computing exactly this layer's forward.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..quant.fake import fake_quantize_ste, lsq_grad_factor
from ..quant.int8 import INT8_MAX, quantize_rows
from ..quant.layout import QuantizedWeight, check_bits, default_g_idx, num_groups

TARGETS = ("layout", "int8")
ACT_MODES = ("dynamic", "static")


def fake_quant_tokens(x: torch.Tensor) -> torch.Tensor:
    """Per-token int8 absmax quantize-dequantize with a straight-through gradient (W8A8's dynamic activations)."""
    q, s = quantize_rows(x.detach())
    return x + ((q.float() * s.unsqueeze(-1)).to(x.dtype) - x).detach()


class FakeQuantLinear(nn.Module):
    def __init__(
        self,
        in_features: int,
        out_features: int,
        bits: int = 4,
        group_size: int = -1,
        sym: bool = True,
        bias: bool = True,
        target: str = "layout",
        act: str | None = None,
        learn_scales: bool = True,
        device=None,
        dtype: torch.dtype = torch.float32,
        source_is_conv1d: bool = False,
    ):
        super().__init__()
        check_bits(bits)
        if target not in TARGETS:
            raise ValueError(f"target must be one of {list(TARGETS)}, got {target!r}")
        if target == "int8" and (bits != 8 or group_size != -1 or not sym):
            raise ValueError("the int8 target (W8A8Linear) has 8-bit symmetric per-row weights: bits=8, group_size=-1, sym=True")
        if act is not None and act not in ACT_MODES:
            raise ValueError(f"act must be None, 'dynamic' or 'static', got {act!r}")
        if act is not None and target != "int8":
            raise ValueError("activation quantization converts to W8A8Linear: it needs target='int8' (8-bit weights)")
        self.in_features, self.out_features = in_features, out_features
        self.bits, self.group_size, self.sym, self.target, self.act = bits, group_size, sym, target, act
        self.source_is_conv1d = source_is_conv1d
        self.weight = nn.Parameter(torch.empty(out_features, in_features, device=device, dtype=dtype))
        self.bias = nn.Parameter(torch.zeros(out_features, device=device, dtype=dtype)) if bias else None
        n_groups = num_groups(in_features, group_size)
        self.register_buffer("weight_scale_base", torch.ones(out_features, n_groups, device=device))
        self.weight_log_scale = nn.Parameter(torch.zeros(out_features, n_groups, device=device), requires_grad=learn_scales)
        # Zero codes as floats (rounded in the forward); learned only for asymmetric layout grids.
        zero = 0.0 if target == "int8" else float(1 << (bits - 1))
        self.weight_zero = nn.Parameter(torch.full((out_features, n_groups), zero, device=device),
                                        requires_grad=learn_scales and not sym)
        if act == "static":
            # 0 until the first batch sets it, then learned through input_log_scale.
            self.register_buffer("input_scale_base", torch.zeros((), device=device))
            self.input_log_scale = nn.Parameter(torch.zeros((), device=device), requires_grad=learn_scales)

    def extra_repr(self) -> str:
        g = "per-channel" if self.group_size == -1 else f"group_size={self.group_size}"
        act = f", act={self.act}" if self.act else ""
        return (f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}, {g}, "
                f"sym={self.sym}, target={self.target}{act}, bias={self.bias is not None}")

    @property
    def weight_scale(self) -> torch.Tensor:
        """The per-group scales ``[out, n_groups]`` (float32, differentiable)."""
        return self.weight_scale_base * self.weight_log_scale.float().exp()

    @property
    def input_scale(self) -> torch.Tensor:
        """The static activation scale (0-d float32, differentiable)."""
        return self.input_scale_base * self.input_log_scale.float().exp()

    @property
    def code_range(self) -> tuple[int, int]:
        return (-INT8_MAX, INT8_MAX) if self.target == "int8" else (0, (1 << self.bits) - 1)

    def _rounded_zero(self, zero: torch.Tensor, ste: bool) -> torch.Tensor:
        """Zero codes as the packed layout stores them: integers in ``[1, 2**bits - 1]`` (as RTN's, so v1 GPTQ
        checkpoints can hold them)."""
        z = zero.clamp(1, self.code_range[1])
        return z if ste else torch.round(z.float())

    # -- initialisation -------------------------------------------------------------------------------------
    def add_weight_placeholder(self) -> None:  # the float weight loads as the latent weight: nothing to add
        pass

    def drop_weight_placeholder(self) -> None:
        pass

    @torch.no_grad()
    def init_from_weight(self, weight: torch.Tensor, observer: str = "minmax") -> None:
        """Take ``weight [out, in]`` as the latent weight and set the scales (and zero codes) from ``observer``'s
        per-group range: with ``minmax`` the forward then equals round-to-nearest quantization exactly."""
        for name, tensor in self.initial_state(weight, observer).items():
            getattr(self, name).copy_(tensor)

    @torch.no_grad()
    def initial_state(self, weight: torch.Tensor, observer: str = "minmax") -> dict[str, torch.Tensor]:
        """Every tensor of the layer for a float ``weight [out, in]`` (see :meth:`init_from_weight`)."""
        from ..methods.rtn import check_finite, qparams_from_range, weight_spec
        from ..quant.observers import make_observer

        check_finite(weight)
        w = weight.detach().float()
        if self.target == "int8":
            obs = make_observer(observer, _row_spec())
            obs.observe(w)
            lo, hi = obs.compute_range()
            absmax = torch.maximum(lo.abs(), hi.abs()).reshape(-1, 1)
            scale = torch.where(absmax > 0, absmax / INT8_MAX, torch.ones_like(absmax))
            zero = torch.zeros_like(scale)
        else:
            obs = make_observer(observer, weight_spec(self.bits, self.group_size, self.in_features, self.sym))
            obs.observe(w)
            lo, hi = obs.compute_range()
            scale, zero = qparams_from_range(lo, hi, self.bits, self.sym, torch.float32)
        state = {"weight": weight.detach().to(self.weight.dtype),
                "weight_scale_base": scale.reshape(self.weight_scale_base.shape),
                "weight_log_scale": torch.zeros(self.weight_log_scale.shape),
                "weight_zero": zero.float().reshape(self.weight_zero.shape)}
        if self.act == "static":  # unset until the first batch
            state.update(input_scale_base=torch.zeros(()), input_log_scale=torch.zeros(()))
        return state

    # -- forward --------------------------------------------------------------------------------------------
    def _grid(self):
        """Per-column scale and zero ``[out, in]`` (each group's repeated over its columns; broadcast if per row)."""
        scale, zero = self.weight_scale, self.weight_zero
        if self.group_size != -1:
            scale = scale.repeat_interleave(self.group_size, dim=1)[:, : self.in_features]
            zero = zero.repeat_interleave(self.group_size, dim=1)[:, : self.in_features]
        return scale, zero

    def fake_quantized_weight(self) -> torch.Tensor:
        qmin, qmax = self.code_range
        per_scale = self.in_features if self.group_size == -1 else self.group_size
        scale, zero = self._grid()
        zero = self._rounded_zero(zero, ste=True) if self.target == "layout" else None
        return fake_quantize_ste(self.weight, scale, zero, qmin, qmax, lsq_grad_factor(per_scale, qmax))

    def _quantize_input(self, x: torch.Tensor) -> torch.Tensor:
        if self.act == "dynamic":
            return fake_quant_tokens(x)
        if not bool(self.input_scale_base > 0):
            with torch.no_grad():
                amax = x.detach().abs().amax().float()
                self.input_scale_base.copy_(torch.where(amax > 0, amax / INT8_MAX, torch.ones_like(amax)))
        factor = lsq_grad_factor(x.numel(), INT8_MAX)
        return fake_quantize_ste(x, self.input_scale, None, -INT8_MAX, INT8_MAX, factor)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.act is not None:
            x = self._quantize_input(x)
        w = self.fake_quantized_weight().to(x.dtype)
        return F.linear(x, w, self.bias.to(x.dtype) if self.bias is not None else None)

    # -- conversion -----------------------------------------------------------------------------------------
    @torch.no_grad()
    def quantized_weight(self) -> QuantizedWeight:
        """The layout codes the forward rounds to (``target="layout"``)."""
        qmin, qmax = self.code_range
        scale, zero = self._grid()
        z = self._rounded_zero(zero, ste=False)
        s = scale.float().clamp(min=torch.finfo(torch.float32).tiny)
        codes = (torch.round(self.weight.float() / s) + z).clamp(qmin, qmax).to(torch.int32)
        zeros = self._rounded_zero(self.weight_zero, ste=False).to(torch.int32)
        return QuantizedWeight(codes, self.weight_scale.detach().float(),
                               zeros, default_g_idx(self.in_features, self.group_size, device=codes.device),
                               self.bits, self.group_size)

    @torch.no_grad()
    def to_quantized(self, scale_dtype: torch.dtype | None = None) -> nn.Module:
        """The packed layer (``QuantLinear`` or ``W8A8Linear``) that computes this layer's forward."""
        dtype = self.weight.dtype
        bias = self.bias.detach() if self.bias is not None else None
        if self.target == "layout":
            from .quant_linear import QuantLinear

            qw = self.quantized_weight()
            qw.scales = qw.scales.to(scale_dtype or dtype)
            layer = QuantLinear(self.in_features, self.out_features, self.bits, self.group_size, bias=bias is not None,
                                dtype=dtype, device=self.weight.device, source_is_conv1d=self.source_is_conv1d,
                                scale_dtype=scale_dtype)
            layer.load_quantized(qw, bias=bias)
            return layer
        from .int8_linear import W8A8Linear

        act = self.act or "dynamic"
        layer = W8A8Linear(self.in_features, self.out_features, act_granularity="per-tensor" if act == "static" else "per-token",
                           static=act == "static", bias=bias is not None, dtype=dtype, device=self.weight.device,
                           source_is_conv1d=self.source_is_conv1d)
        s = self.weight_scale.detach().float().reshape(-1)
        codes = torch.round(self.weight.float() / s.unsqueeze(1)).clamp(-INT8_MAX, INT8_MAX).to(torch.int8)
        layer._parameters.pop("weight", None)
        layer._buffers["weight"], layer._buffers["SCB"] = codes, s * INT8_MAX
        if act == "static":
            if not bool(self.input_scale_base > 0):
                raise ValueError("this layer's static activation scale was never set: run at least one forward pass "
                                 "(a training or calibration batch) before convert_qat")
            layer._buffers["input_scale"] = self.input_scale.detach().clone()
        if bias is not None:
            layer.bias = nn.Parameter(bias.to(dtype), requires_grad=False)
        layer.invalidate_kernel_cache()
        return layer

    def to_float(self, dtype: torch.dtype | None = None) -> nn.Module:
        """The latent float weight as a plain layer (what the model was before QAT, plus training)."""
        from .float_layer import float_layer

        dtype = dtype or self.weight.dtype
        bias = self.bias.detach().to(dtype) if self.bias is not None else None
        return float_layer(self.weight.detach().to(dtype), bias, self.source_is_conv1d)


def _row_spec():
    from ..quant.affine import QuantSpec

    return QuantSpec(bits=8, symmetric=True, signed=True, restricted=True, granularity="channel", axis=0)
