"""PEFT LoRA on every hf_compress layer (quantization-aware fine-tuning, QLoRA-style), and merging it back.

The base layer stays packed: LoRA adds ``B A x`` beside it, and gradients reach ``x`` through the packed
layer's own backward (``grad_out @ W`` with ``W`` dequantized per call, never kept). ``merge_and_unload()``
rounds ``W + B A`` onto the layer's own grid (scales, zero codes and groups stay, so the checkpoint layout and
config do not change and each weight moves by at most the update) and records the error it adds
(:func:`merge_report`); ``unmerge`` restores the packed weights exactly.

PEFT only learns custom layer types per ``LoraConfig`` instance and never saves that mapping, so importing
hf_compress makes every ``LoraConfig`` know our layers (``PeftModel.from_pretrained(base, adapter_dir)`` then
just works) and lets ``target_modules="all-linear"`` find them; :func:`install` applies both adjustments once, on
``import hf_compress``.
"""

from __future__ import annotations

import json
import os
import warnings

import torch
from peft.tuners.lora.layer import Linear as LoraLinear
from peft.tuners.tuners_utils import check_adapters_to_merge
from torch import nn
from transformers.utils import logging

from ..nn.bitlinear import BitLinear, OneBitLinear, PackedBitLinear
from ..nn.int8_linear import Int8Linear
from ..nn.qat_linear import FakeQuantLinear
from ..nn.quant_linear import QuantLinear
from ..nn.sparse_linear import SparseLinear

logger = logging.get_logger(__name__)

__all__ = ["QuantizedLoraLinear", "install", "load_adapter", "lora_config", "merge_report"]

# Packed layers LoRA wraps; their weights can be requantized in place (``requantize_``; a pruned layer keeps its mask).
PACKED_LAYERS = (QuantLinear, Int8Linear, PackedBitLinear, SparseLinear)
# Layers that train their own weights: LoRA beside them would train two things at once.
TRAINABLE_LAYERS = {
    FakeQuantLinear: "a QAT layer (FakeQuantLinear) trains its own weights: train it directly, or call "
    "hf_compress.convert_qat(model) first and put LoRA on the packed model",
    BitLinear: "a training-mode BitLinear trains its own latent weights: train it directly, or pack it with "
    "hf_compress.pack_bitlinear(model) first and put LoRA on the packed model",
    OneBitLinear: "a training-mode OneBitLinear trains its own weights: train it directly, or pack it with "
    "hf_compress.pack_bitlinear(model) first and put LoRA on the packed model",
}


class QuantizedLoraLinear(LoraLinear):
    """``lora.Linear`` over a packed hf_compress layer: same forward, merge by requantizing onto its grid."""

    def __init__(self, base_layer, adapter_name, config, **kwargs):
        config.fan_in_fan_out = False  # our layers compute x @ W.T whatever layer they replaced
        with warnings.catch_warnings():  # PEFT warns about any layer type it does not know: this one it now does
            warnings.filterwarnings("ignore", message="Unsupported layer type")
            super().__init__(base_layer, adapter_name, config=config, **kwargs)
        self._packed_before_merge: dict[str, torch.Tensor] | None = None

    def resolve_lora_variant(self, *, config, **kwargs):
        used = [flag for flags in self.lora_variants if flags for flag in flags if getattr(config, flag, None)]
        if used:
            raise ValueError(
                f"{used[0]} needs the base layer's float weight, which a packed hf_compress layer does not keep: "
                "use plain LoRA on a quantized base, or dequantize() the model first"
            )
        return None

    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        adapter_names = [a for a in check_adapters_to_merge(self, adapter_names) if a in self.lora_A]
        if not adapter_names:
            return
        base = self.get_base_layer()
        packed = {n: t.clone() for n, t in base.named_buffers(recurse=False)}
        before = base.dequantize_weight().float()
        delta = sum(self.get_delta_weight(a).float().to(before.device) for a in adapter_names)
        target = before + delta
        if not bool(torch.isfinite(target).all()):
            raise ValueError(f"NaNs detected in the merged weights: the adapter(s) {adapter_names} seem to be broken")
        bias = base.bias
        for a in adapter_names:
            if self.lora_bias[a]:
                if bias is None:
                    raise RuntimeError("Impossible to merge LoRA with `lora_bias=True` because the base layer has no bias.")
                bias.data += (self.lora_B[a].bias * self.scaling[a]).to(bias.dtype)
        base.requantize_(target)
        after = base.dequantize_weight().float()
        err = (after - target).norm().item()
        base.merge_report = {
            "relative_weight_error": err / max(target.norm().item(), 1e-30),
            "update_kept": 1.0 - err / max(delta.norm().item(), 1e-30),
        }
        logger.info("merged %s into a packed %s: relative weight error %.3g, %.1f%% of the update kept",
                    adapter_names, type(base).__name__, base.merge_report["relative_weight_error"],
                    100 * base.merge_report["update_kept"])
        if base.merge_report["update_kept"] < 0.5:
            logger.warning_once(
                "merging LoRA into packed weights kept less than half of the update in some layers (it is mostly below "
                "half a quantization step and rounds away): see hf_compress.merge_report(model); to keep the adapter's "
                "effect, serve it unmerged (PeftModel) or merge into a float model (model.dequantize() first)"
            )
        if self._packed_before_merge is None:
            self._packed_before_merge = packed
        self.merged_adapters.extend(adapter_names)

    def unmerge(self) -> None:
        if not self.merged:
            return
        base = self.get_base_layer()
        for a in self.merged_adapters:
            if self.lora_bias[a]:
                base.bias.data -= (self.lora_B[a].bias * self.scaling[a]).to(base.bias.dtype)
        for name, t in (self._packed_before_merge or {}).items():
            base._buffers[name] = t
        if hasattr(base, "invalidate_kernel_cache"):
            base.invalidate_kernel_cache()
        base.__dict__.pop("merge_report", None)
        self._packed_before_merge = None
        self.merged_adapters = []

    def __repr__(self) -> str:
        return "lora." + super().__repr__()


def _refuse(reason: str):
    def make(target, adapter_name, config=None, **kwargs):
        raise ValueError(f"LoRA cannot wrap this layer: {reason}")

    return make


def custom_modules() -> dict:
    """PEFT's custom-module mapping for every hf_compress layer (packed ones wrapped, trainable ones refused)."""
    mapping: dict = {cls: QuantizedLoraLinear for cls in PACKED_LAYERS}
    mapping.update({cls: _refuse(reason) for cls, reason in TRAINABLE_LAYERS.items()})
    return mapping


def lora_config(model: nn.Module | None = None, **kwargs):
    """A ``peft.LoraConfig(**kwargs)`` that wraps hf_compress layers. ``target_modules="all-linear"`` is resolved
    on ``model`` when given (float and packed linears, not the output head); without ``model``, PEFT resolves it
    when the adapter is injected (our layers included once hf_compress is imported)."""
    from peft import LoraConfig

    if model is not None and isinstance(kwargs.get("target_modules"), str) and kwargs["target_modules"].lower() == "all-linear":
        kwargs["target_modules"] = sorted(all_linear_names(model))
    config = LoraConfig(**kwargs)
    config._register_custom_module(custom_modules())
    return config


def all_linear_names(model: nn.Module) -> set[str]:
    """Leaf names of every float or packed linear except the output head (what "all-linear" means)."""
    from transformers.pytorch_utils import Conv1D

    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    return {name.rpartition(".")[2] for name, m in model.named_modules()
            if isinstance(m, (nn.Linear, Conv1D, *PACKED_LAYERS)) and m is not head and name}


def merge_report(model: nn.Module) -> dict[str, dict[str, float]]:
    """``{layer: {"relative_weight_error", "update_kept"}}`` for every packed layer a LoRA update was merged into."""
    return {n: dict(m.merge_report) for n, m in model.named_modules() if isinstance(m, PACKED_LAYERS) and hasattr(m, "merge_report")}


def load_adapter(model: nn.Module, path: str, adapter_name: str = "default", is_trainable: bool = False):
    """``PeftModel.from_pretrained(model, path)`` after checking that the adapter fits ``model``: every LoRA matrix
    in ``adapter_model.safetensors`` must match the layer it targets."""
    from peft import PeftModel

    from .quantizer import safetensors_header

    weights = os.path.join(path, "adapter_model.safetensors")
    config_file = os.path.join(path, "adapter_config.json")
    for f in (config_file, weights):
        if not os.path.isfile(f):
            raise FileNotFoundError(f"{f} not found: {path} is not a saved PEFT adapter (save one with model.save_pretrained)")
    with open(config_file) as fh:
        if json.load(fh).get("peft_type") != "LORA":
            raise ValueError(f"{config_file} is not a LoRA adapter: hf_compress.load_adapter loads LoRA adapters")
    modules = dict(model.named_modules())
    for key, (shape, _) in safetensors_header(weights).items():
        for part, dim, attr in ((".lora_A.", 1, "in_features"), (".lora_B.", 0, "out_features")):
            if part not in key or not key.endswith(".weight"):
                continue
            name = key.split(part)[0].removeprefix("base_model.model.")
            layer = modules.get(name) or modules.get(name.partition(".")[2])
            if layer is None:
                raise ValueError(f"the adapter targets {name}, which this model does not have: it was trained for another model")
            layer = layer.get_base_layer() if hasattr(layer, "get_base_layer") else layer
            want = getattr(layer, attr, None)
            if want is not None and shape[dim] != want:
                raise ValueError(
                    f"adapter tensor {key} has shape {shape}, but {name} has {attr}={want}: the adapter was trained on "
                    "a model with other layer sizes; load it on the model it was trained for"
                )
    return PeftModel.from_pretrained(model, path, adapter_name=adapter_name, is_trainable=is_trainable)


# -- the adjustments to PEFT ------------------------------------------------------------------------------------
def install() -> None:
    """Teach PEFT about hf_compress layers (idempotent)."""
    import peft.tuners.tuners_utils as tuners_utils
    from peft import LoraConfig

    if getattr(LoraConfig.__post_init__, "_hf_compress", False):
        return
    post_init = LoraConfig.__post_init__

    def __post_init__(self, *args, **kwargs):
        post_init(self, *args, **kwargs)
        self._register_custom_module(custom_modules())

    __post_init__._hf_compress = True
    LoraConfig.__post_init__ = __post_init__

    include = tuners_utils._maybe_include_all_linear_layers

    def _maybe_include_all_linear_layers(peft_config, model):
        wanted = isinstance(getattr(peft_config, "target_modules", None), str) and peft_config.target_modules.lower() == "all-linear"
        peft_config = include(peft_config, model)
        if wanted:
            head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
            peft_config.target_modules = set(peft_config.target_modules) | {
                n for n, m in model.named_modules() if isinstance(m, PACKED_LAYERS) and m is not head}
        return peft_config

    tuners_utils._maybe_include_all_linear_layers = _maybe_include_all_linear_layers
