"""Quantization-aware training: ``prepare_qat`` / ``convert_qat`` and the ``hf_compress_qat`` quantizer.

``prepare_qat(model, QATConfig(...))`` (or ``from_pretrained(path, quantization_config=QATConfig(...))``) swaps
every convertible linear for a :class:`FakeQuantLinear` initialised from its float weight, and attaches the QAT
quantizer, which tells ``Trainer`` the model trains as is (``is_qat_trainable``). A QAT checkpoint (latent weights
plus scales, as ``Trainer`` saves mid-run) reloads as a QAT model. ``convert_qat(model)`` packs every layer into the
layer its grid was trained for and switches the model to that method's quantizer and config (RTN's
``QuantLinear``, or ``W8A8Linear`` with int8 activations), so ``save_pretrained`` -> ``from_pretrained`` reloads it
packed.
"""

from __future__ import annotations

from torch import nn
from transformers.utils import logging

from ..nn.qat_linear import FakeQuantLinear
from .config import QATConfig
from .modules import float_weight, linear_shape, replace_linears, set_submodule
from .quantizer import CompressedHfQuantizer

logger = logging.get_logger(__name__)

__all__ = ["QATHfQuantizer", "attach_quantizer", "convert_qat", "prepare_qat"]


class QATHfQuantizer(CompressedHfQuantizer):
    quantization_config: QATConfig
    layer_types = (FakeQuantLinear,)

    @property
    def is_qat_trainable(self) -> bool:
        return True

    def describe_config(self) -> str:
        cfg = self.quantization_config
        return f"QATConfig, bits={cfg.bits}, group_size={cfg.group_size}, activations={cfg.activations}"

    def layer_for(self, module: nn.Module, device=None) -> FakeQuantLinear:
        cfg = self.quantization_config
        in_f, out_f = linear_shape(module)
        return FakeQuantLinear(
            in_f, out_f, bits=cfg.bits, group_size=cfg.group_size, sym=cfg.sym, bias=module.bias is not None,
            target="layout" if cfg.activations is None else "int8", act=cfg.activations, learn_scales=cfg.learn_scales,
            device=device, dtype=module.weight.dtype, source_is_conv1d=type(module).__name__ == "Conv1D",
        )

    def quantized_tensors(self, name, weight, module):
        return module.initial_state(weight, self.quantization_config.observer)

    def expected_tensors(self, module):
        return {n: (tuple(t.shape), "F32" if n == "weight" else None) for n, t in module.state_dict().items() if n != "bias"}


def attach_quantizer(model: nn.Module, quantizer) -> None:
    """Make ``model`` carry ``quantizer`` and its config, as ``from_pretrained`` leaves a quantized model."""
    from transformers.quantizers.base import _assign_is_quantized

    model.hf_quantizer = quantizer
    model.is_quantized = True
    model.quantization_method = quantizer.quantization_config.quant_method
    model.config.quantization_config = quantizer.quantization_config
    _assign_is_quantized(model)


def prepare_qat(model: nn.Module, config: QATConfig) -> nn.Module:
    """Replace ``model``'s linears (in place) by fake-quantized :class:`FakeQuantLinear` layers; returns the model.

    The model must be a float transformers model; train it with ``Trainer`` or ``DistillationTrainer`` (with the float
    model as teacher), then call :func:`convert_qat`.
    """
    if not isinstance(config, QATConfig):
        raise ValueError(f"prepare_qat takes a hf_compress.QATConfig, got {type(config).__name__}")
    existing = getattr(model, "hf_quantizer", None)
    if existing is not None:
        raise ValueError(
            f"prepare_qat takes a float model, but this one is already quantized "
            f"({existing.quantization_config.quant_method}): load the float checkpoint, or dequantize() it first"
        )
    quantizer = QATHfQuantizer(config, pre_quantized=False)
    quantizer.modules_to_not_convert = quantizer.get_modules_to_not_convert(
        model, config.modules_to_not_convert, getattr(model, "_keep_in_fp32_modules", None), add_default_skips=True
    )

    def make(name, module):
        layer = quantizer.layer_for(module, device=module.weight.device)
        layer.init_from_weight(float_weight(module), config.observer)
        if module.bias is not None:
            layer.bias.data.copy_(module.bias.detach())
        return layer

    replaced = replace_linears(model, make, quantizer.modules_to_not_convert)
    if not replaced:
        raise quantizer.no_linears_error(model)
    attach_quantizer(model, quantizer)
    logger.info("prepare_qat: %d linear layers fake-quantized (%s)", len(replaced), quantizer.describe_config())
    return model


def convert_qat(model: nn.Module) -> nn.Module:
    """Pack every :class:`FakeQuantLinear` into the layer it was trained for and switch the model's quantizer and
    ``config.quantization_config`` to that method (in place); returns the model."""
    from . import METHODS

    layers = [(n, m) for n, m in model.named_modules() if isinstance(m, FakeQuantLinear)]
    if not layers:
        raise ValueError(
            "convert_qat found no QAT layers in this model: call hf_compress.prepare_qat(model, hf_compress.QATConfig(...)) "
            "first (or load it with quantization_config=QATConfig(...)) and train it"
        )
    qat_config = getattr(model.config, "quantization_config", None)
    if not isinstance(qat_config, QATConfig):
        raise ValueError("the model's quantization_config is not a QATConfig: convert_qat needs the model prepare_qat returned")
    target = qat_config.target_config()
    quantizer_cls = METHODS[target.quant_method][1]
    quantizer = quantizer_cls(target, pre_quantized=True)
    old = getattr(model, "hf_quantizer", None)
    quantizer.modules_to_not_convert = list(getattr(old, "modules_to_not_convert", []) or [])
    for name, module in layers:
        set_submodule(model, name, module.to_quantized(getattr(quantizer, "scale_dtype", None)))
    attach_quantizer(model, quantizer)
    logger.info("convert_qat: %d layers packed as %s", len(layers), type(target).__name__)
    return model
