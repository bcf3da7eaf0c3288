"""The 1.58-bit / 1-bit quantizers (``hf_compress_bitlinear``, ``hf_compress_onebit``), packing a trained model,
and the quantization-strength (λ) warm-up for converting a float model by training.

Training mode: every linear becomes a trainable layer before loading (``BitLinear`` takes the float ``weight``
as its latent weight as is; ``OneBitLinear`` gets its latent weight and SVID vectors from the float weight as
it loads), and the quantizer tells ``Trainer`` the model is QAT-trainable. Inference mode: each float weight
is quantized and packed as it loads (``PackedBitLinear``); a saved packed model reloads packed.
:func:`pack_model` turns a trained model into the packed one and switches its config to inference.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import TrainerCallback
from transformers.utils import logging

from ..nn.bitlinear import BitLinear, OneBitLinear, PackedBitLinear, check_strength
from .config import BitLinearConfig, OneBitConfig
from .modules import linear_shape, set_submodule
from .quantizer import CompressedHfQuantizer

logger = logging.get_logger(__name__)

TRAINABLE = (BitLinear, OneBitLinear)

__all__ = ["BitLinearHfQuantizer", "BitLinearWarmup", "OneBitHfQuantizer", "pack_model", "set_quantization_strength"]


class _LowBitHfQuantizer(CompressedHfQuantizer):
    layer_types = (BitLinear, OneBitLinear, PackedBitLinear)

    @property
    def training(self) -> bool:
        return self.quantization_config.mode == "training"

    @property
    def is_qat_trainable(self) -> bool:
        return self.training

    @property
    def is_compileable(self) -> bool:
        return not self.training

    def param_needs_quantization(self, model, param_name: str, **kwargs) -> bool:
        from transformers.quantizers.quantizers_utils import get_module_from_name

        module, name = get_module_from_name(model, param_name)
        if self.pre_quantized or name != "weight":
            return False
        return isinstance(module, (OneBitLinear, PackedBitLinear))  # BitLinear keeps the float weight as is

    def _process_model_before_weight_loading(self, model, checkpoint_files=None, **kwargs):
        super()._process_model_before_weight_loading(model, checkpoint_files=checkpoint_files, **kwargs)
        # Parameters a float checkpoint lacks (SubLN norms, OneBit's vectors) start at 1 instead of being left
        # to model-specific initialisers that do not know these modules.
        for module in model.modules():
            if isinstance(module, self.layer_types):
                for sub in module.modules():
                    for name, p in list(sub._parameters.items()):
                        if p is not None and p.device.type == "meta" and name != "weight" and (name != "bias" or sub is not module):
                            sub._parameters[name] = nn.Parameter(torch.ones(p.shape, dtype=p.dtype), requires_grad=p.requires_grad)
                module._is_hf_initialized = True

    def _process_model_after_weight_loading(self, model, **kwargs):
        model = super()._process_model_after_weight_loading(model, **kwargs)
        strength = 0.0 if self.training and getattr(self.quantization_config, "warmup_steps", 0) > 0 else 1.0
        set_quantization_strength(model, strength, missing_ok=True)
        return model

    def expected_tensors(self, module):
        if isinstance(module, TRAINABLE):  # a training checkpoint: the latent float weight (and OneBit's vectors)
            return {n: (tuple(p.shape), "F32" if n == "weight" else None) for n, p in module._parameters.items()
                    if p is not None and n != "bias"}
        return {n: (tuple(b.shape), "U8" if b.dtype == torch.uint8 else None) for n, b in module._buffers.items() if b is not None}


class BitLinearHfQuantizer(_LowBitHfQuantizer):
    quantization_config: BitLinearConfig

    def describe_config(self) -> str:
        cfg = self.quantization_config
        return f"BitLinearConfig, bits={cfg.bits}, mode={cfg.mode}, per_channel={cfg.per_channel}"

    def layer_for(self, module: nn.Module, device=None) -> nn.Module:
        cfg = self.quantization_config
        in_f, out_f = linear_shape(module)
        kw = dict(bias=module.bias is not None, bits=cfg.bits, per_channel=cfg.per_channel, sub_ln=cfg.sub_ln,
                  device=device, dtype=module.weight.dtype, source_is_conv1d=type(module).__name__ == "Conv1D")
        return (BitLinear if self.training else PackedBitLinear)(in_f, out_f, **kw)

    def quantized_tensors(self, name, weight, module):
        return module.quantize_weight(weight.float())


class OneBitHfQuantizer(_LowBitHfQuantizer):
    quantization_config: OneBitConfig

    def describe_config(self) -> str:
        cfg = self.quantization_config
        return f"OneBitConfig, mode={cfg.mode}, layernorm={cfg.layernorm}"

    def layer_for(self, module: nn.Module, device=None) -> nn.Module:
        cfg = self.quantization_config
        in_f, out_f = linear_shape(module)
        common = dict(bias=module.bias is not None, device=device, dtype=module.weight.dtype,
                      source_is_conv1d=type(module).__name__ == "Conv1D")
        if self.training:
            return OneBitLinear(in_f, out_f, layernorm=cfg.layernorm, **common)
        return PackedBitLinear(in_f, out_f, bits=1, per_channel=True, in_scale=True, post_norm=cfg.layernorm, **common)

    def quantized_tensors(self, name, weight, module):
        cfg = self.quantization_config
        if isinstance(module, OneBitLinear):
            from ..quant.lowbit import svid

            if not bool(torch.isfinite(weight).all()):
                raise ValueError("the weight holds NaN or inf values: fix the checkpoint before quantizing it")
            _, a, b = svid(weight.float(), cfg.svid)
            w = weight.t() if module.source_is_conv1d else weight
            return {"weight": w, "out_scale": a.to(weight.dtype), "in_scale": b.to(weight.dtype)}
        return module.quantize_weight(weight.float(), svid_method=cfg.svid)


def set_quantization_strength(model: nn.Module, strength: float, missing_ok: bool = False) -> int:
    """Set λ ∈ [0, 1] on every trainable 1.58/1-bit layer (0 = float forward, 1 = fully quantized); returns the
    number of layers set."""
    strength = check_strength(strength)
    n = 0
    for m in model.modules():
        if isinstance(m, TRAINABLE):
            m.strength = strength
            n += 1
    if n == 0 and not missing_ok:
        raise ValueError("the model has no trainable BitLinear / OneBitLinear layers: load it with mode='training'")
    return n


class BitLinearWarmup(TrainerCallback):
    """Raises the quantization strength λ linearly from 0 to 1 over ``steps`` optimizer steps (default: the
    model config's ``warmup_steps``), then keeps it at 1: converting a pretrained model gradually."""

    def __init__(self, steps: int | None = None):
        if steps is not None and (not isinstance(steps, int) or steps < 0):
            raise ValueError(f"steps must be an integer >= 0, got {steps!r}")
        self.steps = steps

    def _steps(self, model) -> int:
        if self.steps is not None:
            return self.steps
        qc = getattr(model.config, "quantization_config", None)
        return getattr(qc, "warmup_steps", 0) if qc is not None else 0

    def _apply(self, state, model):
        steps = self._steps(model)
        set_quantization_strength(model, 1.0 if steps == 0 else min(1.0, state.global_step / steps))

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self._apply(state, model)

    def on_step_end(self, args, state, control, model=None, **kwargs):
        self._apply(state, model)


def pack_model(model: nn.Module) -> nn.Module:
    """Replace every trainable BitLinear / OneBitLinear by its packed inference layer (as trained, at strength 1)
    and switch the model's quantization config to ``mode="inference"``, so ``save_pretrained`` writes the packed
    model and ``from_pretrained`` reloads it packed."""
    layers = [(n, m) for n, m in model.named_modules() if isinstance(m, TRAINABLE)]
    if not layers:
        raise ValueError("the model has no trainable BitLinear / OneBitLinear layers to pack")
    for name, module in layers:
        set_submodule(model, name, module.pack())
    qc = getattr(model.config, "quantization_config", None)
    if isinstance(qc, (BitLinearConfig, OneBitConfig)):
        qc.mode = "inference"
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None and quantizer.quantization_config is not qc and hasattr(quantizer.quantization_config, "mode"):
        quantizer.quantization_config.mode = "inference"
    logger.info("packed %d trainable low-bit layers", len(layers))
    return model
