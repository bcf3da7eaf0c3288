"""The ``HfQuantizer`` subclasses: thin glue between transformers' loading path and our layers.

Quantize on load: every convertible linear becomes a :class:`QuantLinear` on the meta device with a meta
``weight`` placeholder, so the float checkpoint's ``*.weight`` keys reach :class:`QuantizeOnLoad`, which
quantizes one weight at a time (peak memory stays near the quantized size) and returns the packed tensors.
Reload: the modules are built without placeholders and the packed tensors load by name; their shapes are
checked against the config before any weight is read.
"""

from __future__ import annotations

import json
import os
import struct

import torch
from transformers.core_model_loading import ConversionOps
from transformers.quantizers.base import HfQuantizer
from transformers.quantizers.quantizers_utils import get_module_from_name
from transformers.utils import logging

from ..methods.rtn import rtn_quantize
from ..nn.quant_linear import QuantLinear
from ..quant.layout import QuantizedWeight, packed_shapes
from .config import RTNConfig, WeightOnlyConfig
from .modules import linear_shape, replace_linears, report_coverage, set_submodule

logger = logging.get_logger(__name__)


def safetensors_shapes(path: str) -> dict[str, list[int]]:
    """Tensor shapes from a safetensors header (reads only the header, never the data)."""
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
    return {k: v["shape"] for k, v in header.items() if k != "__metadata__"}


class QuantizeOnLoad(ConversionOps):
    """Turns one float ``weight`` into the packed tensors of its :class:`QuantLinear`."""

    def __init__(self, hf_quantizer: WeightOnlyHfQuantizer):
        self.hf_quantizer = hf_quantizer

    def convert(self, input_dict, model=None, full_layer_name=None, missing_keys=None, **kwargs):
        (key, value), = input_dict.items()
        value = value[0] if isinstance(value, list) else value
        module, _ = get_module_from_name(model, key)
        prefix = key.rpartition(".")[0]
        weight = value.t() if module.source_is_conv1d else value
        try:
            qw = self.hf_quantizer.quantize_weight(prefix, weight, module)
        except ValueError as e:
            # transformers turns conversion errors into a generic RuntimeError; keep ours and raise it after loading.
            self.hf_quantizer.load_errors.append(f"{key}: {e}")
            qw = rtn_quantize(torch.zeros_like(weight, dtype=module.scales.dtype), module.bits, module.group_size)
        module._parameters.pop("weight", None)
        if missing_keys is not None:
            missing_keys.discard(key)
        return {f"{prefix}.{name}": t for name, t in qw.pack().items()}


class WeightOnlyHfQuantizer(HfQuantizer):
    """Shared by every method that stores the packed weight-only layout; subclasses define ``quantize_weight``."""

    requires_calibration = False
    quantization_config: WeightOnlyConfig

    def __init__(self, quantization_config, **kwargs):
        super().__init__(quantization_config, **kwargs)
        self.load_errors: list[str] = []
        self.modules_to_not_convert: list[str] = []

    # -- what transformers asks ---------------------------------------------------------------------------
    def is_serializable(self):
        return True

    @property
    def is_trainable(self) -> bool:
        return True

    @property
    def is_compileable(self) -> bool:
        return True

    def param_needs_quantization(self, model, param_name: str, **kwargs) -> bool:
        module, name = get_module_from_name(model, param_name)
        return not self.pre_quantized and isinstance(module, QuantLinear) and name == "weight"

    def get_quantize_ops(self):
        return QuantizeOnLoad(self)

    def quantize_weight(self, name: str, weight: torch.Tensor, module: QuantLinear) -> QuantizedWeight:
        raise NotImplementedError

    # -- before loading: swap the layers ----------------------------------------------------------------------
    def _process_model_before_weight_loading(self, model, checkpoint_files=None, **kwargs):
        cfg = self.quantization_config
        self.modules_to_not_convert = self.get_modules_to_not_convert(
            model, cfg.modules_to_not_convert, model._keep_in_fp32_modules, add_default_skips=True
        )
        quantized_numel = 0

        def make(name, module):
            nonlocal quantized_numel
            in_f, out_f = linear_shape(module)
            quantized_numel += in_f * out_f
            layer = QuantLinear(
                in_f,
                out_f,
                cfg.bits,
                cfg.group_size,
                bias=module.bias is not None,
                dtype=module.weight.dtype,
                device="meta",
                source_is_conv1d=type(module).__name__ == "Conv1D",
            )
            if not self.pre_quantized:
                layer.add_weight_placeholder()
            return layer

        replaced = replace_linears(model, make, self.modules_to_not_convert)
        if not replaced:
            raise ValueError(
                f"{type(model).__name__} has no linear layers to quantize (after skipping {sorted(self.modules_to_not_convert)}): "
                "hf_compress quantizes nn.Linear and Conv1D layers"
            )
        report_coverage(model, replaced, quantized_numel)
        # Some models' _init_weights re-initialise a child's `.weight` from the parent (GPT-2's c_proj). A parent
        # without parameters of its own has nothing else to initialise, so mark it done.
        for name in replaced:
            parent = model.get_submodule(name.rpartition(".")[0])
            if not any(True for _ in parent.parameters(recurse=False)):
                parent._is_hf_initialized = True
        if self.pre_quantized and checkpoint_files:
            self.check_checkpoint(model, checkpoint_files)

    def check_checkpoint(self, model, checkpoint_files) -> None:
        """Refuse a checkpoint whose packed tensors contradict the config before reading any weight."""
        shapes = {}
        for f in checkpoint_files:
            if str(f).endswith(".safetensors") and os.path.isfile(f):
                shapes.update(safetensors_shapes(f))
        if not shapes:
            return
        cfg = self.quantization_config
        for name, module in model.named_modules():
            if not isinstance(module, QuantLinear):
                continue
            expected = packed_shapes(module.in_features, module.out_features, cfg.bits, cfg.group_size)
            for tensor, shape in expected.items():
                found = next((shapes[k] for k in (f"{name}.{tensor}", f"{model.base_model_prefix}.{name}.{tensor}") if k in shapes), None)
                if found is not None and tuple(found) != shape:
                    raise ValueError(
                        f"checkpoint tensor {name}.{tensor} has shape {list(found)} but quantization_config "
                        f"(bits={cfg.bits}, group_size={cfg.group_size}) expects {list(shape)} for a "
                        f"{module.in_features}->{module.out_features} layer: the config contradicts the packed "
                        "weights; fix quantization_config in config.json or re-quantize the model"
                    )
            if f"{name}.weight" in shapes and f"{name}.qweight" not in shapes:
                raise ValueError(
                    f"checkpoint stores {name}.weight in float but quantization_config says it is quantized: "
                    "add it to modules_to_not_convert or re-quantize the model"
                )

    # -- after loading ---------------------------------------------------------------------------------------
    def _process_model_after_weight_loading(self, model, **kwargs):
        if self.load_errors:
            errors, self.load_errors = self.load_errors, []
            raise ValueError("cannot quantize this model:\n  " + "\n  ".join(errors))
        left = [n for n, m in model.named_modules() if isinstance(m, QuantLinear) and "weight" in m._parameters]
        if left:
            raise ValueError(f"the checkpoint has no weight for {left[:5]}{'...' if len(left) > 5 else ''}: nothing to quantize")
        return model

    def _dequantize(self, model, dtype=None):
        for name, module in list(model.named_modules()):
            if isinstance(module, QuantLinear):
                layer = module.to_float()
                if dtype is not None:
                    layer = layer.to(dtype)
                set_submodule(model, name, layer)
        return model


class RTNHfQuantizer(WeightOnlyHfQuantizer):
    quantization_config: RTNConfig

    def quantize_weight(self, name, weight, module):
        cfg = self.quantization_config
        return rtn_quantize(weight, cfg.bits, cfg.group_size, cfg.sym, scale_dtype=module.scales.dtype)


