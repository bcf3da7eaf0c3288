"""The low-rank quantizer: plain SVD as each float weight loads; ASVD and whitened SVD calibrated block by block
after loading (the layer-wise driver, with GPTQ's Hessian as the activation statistics)."""

from __future__ import annotations

import torch
from torch import nn
from transformers.utils import logging

from ..methods.gptq import GPTQ, relative_output_error
from ..methods.lowrank import factorize
from ..methods.rtn import rtn_quantize
from ..nn.lowrank_linear import LowRankLinear
from ..nn.quant_linear import QuantLinear
from ..quant.layout import packed_shapes
from .config import LowRankConfig
from .modules import float_weight, linear_shape
from .quantizer import CalibrateAfterLoading, CompressedHfQuantizer

logger = logging.get_logger(__name__)


class LowRankHfQuantizer(CalibrateAfterLoading, CompressedHfQuantizer):
    quantization_config: LowRankConfig
    layer_types = (LowRankLinear,)

    @property
    def calibrates(self) -> bool:
        return not self.pre_quantized and self.quantization_config.needs_calibration

    def layer_for(self, module: nn.Module, device=None) -> LowRankLinear:
        cfg = self.quantization_config
        in_f, out_f = linear_shape(module) or (module.in_features, module.out_features)
        rank = cfg.rank_for(in_f, out_f)
        dtype = module.weight.dtype
        factors = {}
        if cfg.bits is not None:
            factors = {"down": QuantLinear(in_f, rank, cfg.bits, cfg.group_size, bias=False, dtype=dtype, device=device),
                       "up": QuantLinear(rank, out_f, cfg.bits, cfg.group_size, bias=False, dtype=dtype, device=device)}
        return LowRankLinear(in_f, out_f, rank, bias=module.bias is not None, dtype=dtype, device=device,
                             source_is_conv1d=type(module).__name__ == "Conv1D", **factors)

    def expected_tensors(self, module):
        cfg = self.quantization_config
        shapes = {"down": (module.in_features, module.rank), "up": (module.rank, module.out_features)}
        if cfg.bits is None:
            return {f"{n}.weight": ((o, i), None) for n, (i, o) in shapes.items()}
        return {f"{n}.{t}": (s, None) for n, (i, o) in shapes.items() for t, s in packed_shapes(i, o, cfg.bits, cfg.group_size).items()}

    def describe_config(self) -> str:
        cfg = self.quantization_config
        return f"LowRankConfig(method={cfg.method}, " + (f"rank={cfg.rank}" if cfg.rank else f"param_ratio={cfg.param_ratio}") + ")"

    def factor_tensors(self, up: torch.Tensor, down: torch.Tensor, dtype: torch.dtype) -> dict[str, torch.Tensor]:
        """The stored tensors of float factors: as they are, or RTN-packed."""
        cfg = self.quantization_config
        if cfg.bits is None:
            return {"up.weight": up.to(dtype), "down.weight": down.to(dtype)}
        return {f"{n}.{t}": v for n, w in (("up", up), ("down", down))
                for t, v in rtn_quantize(w, cfg.bits, cfg.group_size, cfg.sym, scale_dtype=dtype).pack().items()}

    def quantized_tensors(self, name, weight, module):
        up, down = factorize(weight, module.rank, "svd")
        return self.factor_tensors(up, down, module.bias.dtype if module.bias is not None else weight.dtype)

    def calibrate(self, model) -> dict[str, float]:
        """Calibrate and factorise every convertible linear; returns each layer's relative output error."""
        from .calibration import calibration_tokens
        from .layerwise import compress_layerwise

        cfg = self.quantization_config
        windows = calibration_tokens(model, cfg)
        errors: dict[str, float] = {}

        def compress(name, linear, gptq):
            weight = float_weight(linear).detach()
            layer = self.layer_for(linear, device=weight.device)
            up, down = factorize(weight, layer.rank, cfg.method, gptq.H, alpha=cfg.alpha, damp_percent=cfg.damp_percent)
            layer.load_state_dict(self.factor_tensors(up, down, weight.dtype), strict=False, assign=True)
            if linear.bias is not None:
                layer.bias = nn.Parameter(linear.bias.detach().clone(), requires_grad=False)
            approx = layer.dequantize_weight().to(weight.dtype)
            errors[name] = relative_output_error(weight, approx, gptq.H)
            linear.weight.data.copy_(approx.t() if type(linear).__name__ == "Conv1D" else approx)
            return layer

        was_training = model.training
        model.eval()
        done = compress_layerwise(
            model, windows, make_observer=lambda linears: GPTQ(linear_shape(linears[0])[0]), compress=compress,
            skip=self.modules_to_not_convert, true_sequential=cfg.true_sequential, desc=f"low-rank {cfg.method}",
        )
        model.train(was_training)
        self.keep_uncalibrated_float(model, done, f"low-rank {cfg.method}")
        logger.info("low-rank %s factorised %d linear layers; relative output error mean %.3g", cfg.method, len(errors),
                    sum(errors.values()) / max(1, len(errors)))
        model.hf_compress_layer_errors = errors
        return errors
