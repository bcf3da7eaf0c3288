"""The int8-activation quantizers: LLM.int8 (``hf_compress_int8``) and W8A8 (``hf_compress_w8a8``).

LLM.int8 and dynamic W8A8 without smoothing quantize each weight as it loads. Static W8A8 and SmoothQuant
need activations: the float model loads, then the layer-wise driver runs the calibration windows block by
block, and each group of linears sharing an input gets its smoothing factors and static scale from an
:class:`~hf_compress.methods.smoothquant.ActivationCalibrator`. Each layer is swapped in as soon as it is
quantized, so later layers calibrate on the activations the quantized model really produces.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers.utils import logging

from ..methods.smoothquant import ActivationCalibrator
from ..nn.int8_linear import Int8Linear, Int8MixedLinear, W8A8Linear
from .config import Int8MixedConfig, W8A8Config
from .modules import float_weight, linear_shape, set_submodule
from .quantizer import CalibrateAfterLoading, CompressedHfQuantizer

logger = logging.get_logger(__name__)


class Int8HfQuantizer(CompressedHfQuantizer):
    """Shared by the int8 weight + int8 activation methods (state: ``weight`` int8, ``SCB`` and extras)."""

    layer_types = (Int8Linear,)

    @property
    def is_compileable(self) -> bool:
        return False  # the outlier columns and dynamic scales are data-dependent

    def layer_kwargs(self) -> dict:
        return {}

    layer_class: type[Int8Linear] = Int8Linear

    def layer_for(self, module: nn.Module, device=None) -> Int8Linear:
        in_f, out_f = linear_shape(module)
        return self.layer_class(
            in_f,
            out_f,
            bias=module.bias is not None,
            dtype=module.weight.dtype,
            device=device,
            source_is_conv1d=type(module).__name__ == "Conv1D",
            **self.layer_kwargs(),
        )

    def quantized_tensors(self, name, weight, module):
        return module.quantize_weight(weight)

    def expected_tensors(self, module):
        return {n: (tuple(b.shape), "I8" if b.dtype == torch.int8 else None) for n, b in module._buffers.items() if b is not None}


class Int8MixedHfQuantizer(Int8HfQuantizer):
    quantization_config: Int8MixedConfig
    layer_class = Int8MixedLinear

    def layer_kwargs(self) -> dict:
        return {"threshold": self.quantization_config.threshold}

    def describe_config(self) -> str:
        return f"Int8MixedConfig, threshold={self.quantization_config.threshold}"


class W8A8HfQuantizer(CalibrateAfterLoading, Int8HfQuantizer):
    quantization_config: W8A8Config
    layer_class = W8A8Linear

    def layer_kwargs(self) -> dict:
        cfg = self.quantization_config
        return {
            "act_granularity": cfg.act_granularity,
            "static": cfg.mode == "static",
            "smooth": cfg.smooth_alpha is not None,
        }

    def describe_config(self) -> str:
        cfg = self.quantization_config
        return f"W8A8Config, mode={cfg.mode}, act_granularity={cfg.act_granularity}, smooth_alpha={cfg.smooth_alpha}"

    @property
    def calibrates(self) -> bool:
        return not self.pre_quantized and self.quantization_config.needs_calibration

    def _process_model_before_weight_loading(self, model, checkpoint_files=None, **kwargs):
        cfg = self.quantization_config
        if self.calibrates and cfg.dataset is None:
            what = "mode='static'" if cfg.mode == "static" else f"smooth_alpha={cfg.smooth_alpha}"
            raise ValueError(
                f"W8A8Config({what}) needs calibration data to fix activation ranges: pass dataset= (a text file, "
                "a list of strings, a datasets.Dataset or token ids), or --calib FILE on the command line; "
                "mode='dynamic' without smoothing needs none"
            )
        return super()._process_model_before_weight_loading(model, checkpoint_files=checkpoint_files, **kwargs)

    def calibrate(self, model) -> dict[str, nn.Module]:
        from .calibration import calibration_tokens
        from .layerwise import compress_layerwise

        cfg = self.quantization_config
        static = cfg.mode == "static"
        windows = calibration_tokens(model, cfg)

        def make_observer(linears):
            weights = [float_weight(lin) for lin in linears]
            return ActivationCalibrator(weights, cfg.smooth_alpha, cfg.observer if static else None)

        def compress(name, linear, calib):
            weight = float_weight(linear).detach().float()
            layer = self.layer_for(linear, device=weight.device)
            smooth = calib.smooth
            layer.load_float_weight(weight if smooth is None else weight * smooth, bias=linear.bias)
            if smooth is not None:
                layer.smooth.copy_(smooth)
            if static:
                layer.input_scale.copy_(calib.input_scale())
            layer.invalidate_kernel_cache()
            # Swap it in now: the next groups and blocks calibrate on int8 activations, as the model will run.
            set_submodule(model, name, layer)
            return layer

        was_training = model.training
        model.eval()
        desc = f"W8A8 {cfg.mode}" + (f" smooth {cfg.smooth_alpha}" if cfg.smooth_alpha is not None else "")
        done = compress_layerwise(
            model, windows, make_observer=make_observer, compress=compress, skip=self.modules_to_not_convert, desc=desc
        )
        model.train(was_training)
        self.keep_uncalibrated_float(model, done, "W8A8")
        return done
