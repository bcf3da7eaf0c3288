"""1-bit and 1.58-bit linear layers: trainable (``BitLinear``, ``OneBitLinear``) and packed (``PackedBitLinear``).

- ``BitLinear`` (BitNet / BitNet b1.58, for quantization-aware training): latent full-precision weights,
  quantized in every forward (ternary absmean or binary sign, per tensor or per output row) with activations
  quantized per token to int8 (absmax / 127), both through straight-through estimators, optionally after an
  RMSNorm (SubLN). ``strength`` λ ∈ [0, 1] blends float and quantized (x + λ·(Q(x) − x)) so a pretrained model
  can be converted gradually (λ warm-up).
- ``OneBitLinear`` (OneBit): Y = LN(((X ⊙ g) · sign(W)ᵀ) ⊙ h) (+ bias), the sign of a latent weight (STE) and
  two trained value vectors g [in], h [out] initialised by SVID, LN a LayerNorm without affine parameters on the
  output as in the paper's code; activations quantized per token to int8 like BitLinear's, so the packed layer
  computes exactly what was trained.
- ``PackedBitLinear``: the inference layer for all three: packed codes (``qweight``, 2 bits ternary or 1 bit
  binary, layout in :mod:`hf_compress.quant.lowbit`), ``weight_scale`` ([1] or [out]), and OneBit's
  ``in_scale`` / output LayerNorm or BitNet's SubLN when present. Its forward runs the low-bit kernels.

None of them subclasses ``nn.Linear``, so generic code (our own quantizers, PEFT) never mistakes them for float
layers.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .. import kernels
from ..quant.int8 import quantize_rows
from ..quant.lowbit import binary_sign, pack_binary, pack_ternary, padded_width, svid, ternary_absmean, unpack_codes
from .float_layer import float_layer

__all__ = ["BitLinear", "OneBitLinear", "PackedBitLinear", "check_strength", "storage_bits"]

WEIGHT_BITS = (1.58, 1)


def storage_bits(bits: float) -> int:
    """Bits each packed weight takes: 2 for ternary (1.58), 1 for binary."""
    if bits == 1.58:
        return 2
    if bits == 1:
        return 1
    raise ValueError(f"BitNet weights are 1.58-bit (ternary) or 1-bit (binary), got bits={bits!r}")


def check_strength(value: float) -> float:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not 0.0 <= value <= 1.0:
        raise ValueError(f"the quantization strength lambda must be in [0, 1] (0 = float, 1 = fully quantized), got {value!r}")
    return float(value)


def fake_quant_activations(x: torch.Tensor) -> torch.Tensor:
    """Per-token int8 absmax quantize-dequantize (``quantize_rows``), float in ``x``'s dtype."""
    q, s = quantize_rows(x)
    return (q.float() * s.unsqueeze(-1)).to(x.dtype)


def _blend(x: torch.Tensor, q: torch.Tensor, strength: float) -> torch.Tensor:
    """x + λ·(q − x) in the forward, gradient of the identity (straight-through estimator)."""
    if strength == 0.0:
        return x
    return x + (q - x).detach() * strength


class _RMSNorm(nn.Module):
    """RMSNorm before activation quantization (BitNet's SubLN)."""

    def __init__(self, width: int, eps: float = 1e-6, device=None, dtype=None):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(width, device=device, dtype=dtype))
        self.eps = eps

    def forward(self, x):
        xf = x.float()
        y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return (y * self.weight.float()).to(x.dtype)

    def reset_parameters(self):
        nn.init.ones_(self.weight)


class _LowBitBase(nn.Module):
    def __init__(self, in_features, out_features, source_is_conv1d=False):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.source_is_conv1d = source_is_conv1d

    def _oriented(self, w: torch.Tensor) -> torch.Tensor:
        """The latent weight as ``[out, in]`` (GPT-2's Conv1D checkpoints store ``[in, out]``)."""
        return w.t() if self.source_is_conv1d else w

    # A trainable layer keeps the float ``weight`` as its latent weight: loading needs no placeholder.
    def add_weight_placeholder(self) -> None:
        pass

    def drop_weight_placeholder(self) -> None:
        pass

    def _weight_param(self, device, dtype) -> nn.Parameter:
        shape = (self.in_features, self.out_features) if self.source_is_conv1d else (self.out_features, self.in_features)
        return nn.Parameter(torch.empty(shape, device=device, dtype=dtype))


class BitLinear(_LowBitBase):
    """Trainable BitNet linear (see the module docstring). ``bits``: 1.58 (ternary) or 1 (binary)."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, bits: float = 1.58,
                 per_channel: bool = False, sub_ln: bool = False, eps: float = 1e-6, device=None,
                 dtype=torch.float32, source_is_conv1d: bool = False):
        super().__init__(in_features, out_features, source_is_conv1d)
        storage_bits(bits)
        self.bits, self.per_channel = bits, per_channel
        self.weight = self._weight_param(device, dtype)
        self.bias = nn.Parameter(torch.zeros(out_features, device=device, dtype=dtype)) if bias else None
        self.norm = _RMSNorm(in_features, eps, device=device, dtype=dtype) if sub_ln else None
        self.strength = 1.0

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}, "
                f"per_channel={self.per_channel}, sub_ln={self.norm is not None}, strength={self.strength}")

    def quantized_weight(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(codes int8 [out, in], scale float32 [1] or [out])`` of the current latent weight."""
        w = self._oriented(self.weight.detach())
        return (ternary_absmean if self.bits == 1.58 else binary_sign)(w, self.per_channel)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.norm is not None:
            x = self.norm(x)
        lam = self.strength
        w = self._oriented(self.weight)
        if lam > 0:
            codes, scale = self.quantized_weight()
            w_q = (codes.float() * scale.reshape(-1, 1)).to(w.dtype)
            w = _blend(w, w_q, lam)
            x = _blend(x, fake_quant_activations(x.detach()), lam)
        return F.linear(x, w, self.bias)

    def to_float(self, dtype: torch.dtype | None = None) -> nn.Module:
        """The latent float weights as a plain layer (what the model was before quantization-aware training)."""
        if self.norm is not None:
            raise ValueError("this layer normalises its input (SubLN): no plain nn.Linear computes the same function")
        w = self._oriented(self.weight.detach())
        dtype = dtype or w.dtype
        return float_layer(w.to(dtype), self.bias.detach().to(dtype) if self.bias is not None else None, self.source_is_conv1d)

    def pack(self) -> PackedBitLinear:
        """The packed inference layer computing what this layer computes at strength 1."""
        codes, scale = self.quantized_weight()
        layer = PackedBitLinear(self.in_features, self.out_features, bits=self.bits, bias=self.bias is not None,
                                per_channel=self.per_channel, sub_ln=self.norm is not None,
                                dtype=self.weight.dtype, device=self.weight.device, source_is_conv1d=self.source_is_conv1d)
        layer.load_codes(codes, scale, bias=self.bias)
        if self.norm is not None:
            layer.norm.load_state_dict(self.norm.state_dict())
            layer.norm.eps = self.norm.eps
        return layer


class _SignSTE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, w):
        return torch.where(w >= 0, 1.0, -1.0).to(w.dtype)

    @staticmethod
    def backward(ctx, grad):
        return grad


class OneBitLinear(_LowBitBase):
    """Trainable OneBit linear (see the module docstring); :meth:`init_svid` sets it from a float weight."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, layernorm: bool = False,
                 device=None, dtype=torch.float32, source_is_conv1d: bool = False):
        super().__init__(in_features, out_features, source_is_conv1d)
        self.weight = self._weight_param(device, dtype)
        self.in_scale = nn.Parameter(torch.ones(in_features, device=device, dtype=dtype))
        self.out_scale = nn.Parameter(torch.ones(out_features, device=device, dtype=dtype))
        self.bias = nn.Parameter(torch.zeros(out_features, device=device, dtype=dtype)) if bias else None
        self.layernorm = layernorm
        self.strength = 1.0  # activation quantization blend, as BitLinear's

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, layernorm={self.layernorm}"

    @torch.no_grad()
    def init_svid(self, weight: torch.Tensor, method: str = "svd") -> None:
        """W ≈ sign(W) ⊙ (a bᵀ): the latent weight keeps W (its sign is used), h = a, g = b."""
        sign, a, b = svid(weight, method)
        self.weight.copy_(weight.t() if self.source_is_conv1d else weight)
        self.out_scale.copy_(a)
        self.in_scale.copy_(b)

    def to_float(self, dtype: torch.dtype | None = None) -> nn.Module:
        return self.pack().to_float(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x * self.in_scale
        if self.strength > 0:
            x = _blend(x, fake_quant_activations(x.detach()), self.strength)
        y = F.linear(x, _SignSTE.apply(self._oriented(self.weight))) * self.out_scale
        if self.layernorm:
            y = F.layer_norm(y, (self.out_features,))
        return y + self.bias if self.bias is not None else y

    def pack(self) -> PackedBitLinear:
        w = self._oriented(self.weight.detach())
        codes = torch.where(w >= 0, 1, -1).to(torch.int8)
        layer = PackedBitLinear(self.in_features, self.out_features, bits=1, bias=self.bias is not None,
                                per_channel=True, in_scale=True, post_norm=self.layernorm,
                                dtype=self.weight.dtype, device=self.weight.device, source_is_conv1d=self.source_is_conv1d)
        layer.load_codes(codes, self.out_scale.detach().float(), bias=self.bias)
        layer.in_scale.copy_(self.in_scale.detach().float())
        return layer


class PackedBitLinear(_LowBitBase):
    """Packed 1.58-bit / 1-bit linear for inference (see the module docstring)."""

    _FLOAT32_BUFFERS = ("weight_scale", "in_scale")

    def __init__(self, in_features: int, out_features: int, bits: float = 1.58, bias: bool = True,
                 per_channel: bool = False, in_scale: bool = False, post_norm: bool = False, sub_ln: bool = False,
                 eps: float = 1e-6, device=None, dtype=torch.float32, source_is_conv1d: bool = False):
        super().__init__(in_features, out_features, source_is_conv1d)
        self.bits = bits
        self.storage_bits = storage_bits(bits)
        self.per_channel, self.post_norm = per_channel, post_norm
        width = padded_width(in_features, self.storage_bits) * self.storage_bits // 8
        self.register_buffer("qweight", torch.zeros(out_features, width, dtype=torch.uint8, device=device))
        self.register_buffer("weight_scale", torch.ones(out_features if per_channel else 1, dtype=torch.float32, device=device))
        if in_scale:
            self.register_buffer("in_scale", torch.ones(in_features, dtype=torch.float32, device=device))
        self.bias = nn.Parameter(torch.zeros(out_features, dtype=dtype, device=device), requires_grad=False) if bias else None
        self.norm = _RMSNorm(in_features, eps, device=device, dtype=dtype) if sub_ln else None
        if self.norm is not None:
            self.norm.weight.requires_grad_(False)
        self.compute_dtype = dtype

    def extra_repr(self) -> str:
        extra = "".join(f", {k}" for k, on in (("per_channel", self.per_channel), ("in_scale", self.has_in_scale),
                                                ("post_norm", self.post_norm), ("sub_ln", self.norm is not None)) if on)
        return f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}{extra}, bias={self.bias is not None}"

    @property
    def has_in_scale(self) -> bool:
        return self._buffers.get("in_scale") is not None

    # -- state ---------------------------------------------------------------------------------------
    def add_weight_placeholder(self) -> None:
        """A meta float ``weight`` so a float checkpoint's key finds this module while quantizing on load."""
        shape = (self.in_features, self.out_features) if self.source_is_conv1d else (self.out_features, self.in_features)
        self.weight = nn.Parameter(torch.empty(shape, device="meta"), requires_grad=False)

    def drop_weight_placeholder(self) -> None:
        self._parameters.pop("weight", None)

    def quantize_weight(self, weight: torch.Tensor, svid_method: str = "svd") -> dict[str, torch.Tensor]:
        """The stored tensors for a float weight ``[out, in]``: absmean ternary / sign binary, or SVID (OneBit)."""
        if not bool(torch.isfinite(weight).all()):
            raise ValueError("the weight holds NaN or inf values: fix the checkpoint before quantizing it")
        if self.has_in_scale:  # OneBit
            sign, a, b = svid(weight.float(), svid_method)
            return {"qweight": pack_binary(sign), "weight_scale": a.float(), "in_scale": b.float()}
        codes, scale = (ternary_absmean if self.bits == 1.58 else binary_sign)(weight, self.per_channel)
        pack = pack_ternary if self.bits == 1.58 else pack_binary
        return {"qweight": pack(codes), "weight_scale": scale.float()}

    def load_codes(self, codes: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None = None) -> None:
        pack = pack_ternary if self.storage_bits == 2 else pack_binary
        self._parameters.pop("weight", None)
        self.qweight = pack(codes.to(self.qweight.device))
        self.weight_scale = scale.float().reshape(-1).to(self.qweight.device).clone()
        if bias is not None:
            self.bias = nn.Parameter(bias.detach().to(self.compute_dtype).clone(), requires_grad=False)

    def codes(self) -> torch.Tensor:
        return unpack_codes(self.qweight, self.storage_bits, self.in_features)

    def dequantize_weight(self) -> torch.Tensor:
        """float32 ``[out, in]``: scale · codes (OneBit: h ⊙ sign ⊙ g), before activation quantization and norms."""
        w = self.codes().float() * self.weight_scale.reshape(-1, 1)
        return w * self.in_scale.reshape(1, -1) if self.has_in_scale else w

    def packed_weight_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.buffers(recurse=False))

    @torch.no_grad()
    def requantize_(self, weight: torch.Tensor) -> None:
        """Store ``weight [out, in]`` rounded onto this layer's own grid (ternary {-1, 0, 1} or binary ±1 times its
        scales, which stay). Layers that normalise their input or output cannot take a weight update."""
        if self.post_norm or self.norm is not None:
            raise ValueError(
                "this layer normalises its input (SubLN) or output (OneBit's LayerNorm), so an update added beside it "
                "(LoRA) cannot be folded into its weight: keep the adapter unmerged (save it on its own and load it "
                "with PeftModel.from_pretrained)"
            )
        if not bool(torch.isfinite(weight).all()):
            raise ValueError("the weight holds NaN or inf values: cannot requantize it")
        step = self.weight_scale.reshape(-1, 1)
        if self.has_in_scale:
            step = step * self.in_scale.reshape(1, -1)
        ratio = weight.float().to(step.device) / step
        if self.storage_bits == 2:
            codes = torch.round(ratio).clamp_(-1, 1)
        else:
            codes = torch.where(ratio >= 0, 1, -1)
        self.load_codes(codes.to(torch.int8), self.weight_scale)

    def to_float(self, dtype: torch.dtype | None = None) -> nn.Module:
        if self.post_norm or self.norm is not None:
            raise ValueError(
                "this layer normalises its input (SubLN) or output (OneBit's LayerNorm): no plain nn.Linear computes "
                "the same function, so dequantize() cannot give a float model; keep it packed"
            )
        dtype = dtype or self.compute_dtype
        return float_layer(self.dequantize_weight().to(dtype), self.bias.detach().to(dtype) if self.bias is not None else None,
                           self.source_is_conv1d)

    def _apply(self, fn, recurse=True):
        # model.to(dtype) must not round the scales: they follow the device, never the dtype.
        kept = {n: self._buffers.pop(n) for n in self._FLOAT32_BUFFERS if self._buffers.get(n) is not None}
        out = super()._apply(fn, recurse)
        for n, t in kept.items():
            moved = fn(t)
            self._buffers[n] = moved if moved.dtype == t.dtype else t.to(moved.device)
        if self.bias is not None:
            self.compute_dtype = self.bias.dtype
        return out

    # -- forward ---------------------------------------------------------------------------------------
    def _pre(self, x):
        return self.norm(x) if self.norm is not None else x

    def _post(self, y):
        if self.post_norm:
            y = F.layer_norm(y, (self.out_features,))
            if self.bias is not None:
                y = y + self.bias
        return y

    def forward_reference(self, x: torch.Tensor) -> torch.Tensor:
        from ..quant.lowbit import lowbit_linear_reference

        bias = None if self.post_norm else self.bias
        y = lowbit_linear_reference(self._pre(x), self.qweight, self.weight_scale, self._buffers.get("in_scale"), bias,
                                    self.storage_bits, self.in_features)
        return self._post(y)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.norm is None and not self.post_norm:  # BitNet without SubLN: the decode hot path
            return kernels.lowbit_linear(x, self, bias=self.bias)
        return self._post(kernels.lowbit_linear(self._pre(x), self, bias=None if self.post_norm else self.bias))
