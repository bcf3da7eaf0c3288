"""The low-rank quantizer: plain SVD as each float weight loads; ASVD and whitened SVD calibrated block by block
after loading (the layer-wise driver, with GPTQ's Hessian as the activation statistics). With
``rank_allocation="sensitivity"`` every layer's spectrum is measured first (a pass of the driver that changes
nothing, or the weights alone for SVD), the ranks are shared out, then the layers are factorised."""

from __future__ import annotations

import torch
from torch import nn
from transformers.utils import logging

from ..methods.gptq import GPTQ, relative_output_error
from ..methods.lowrank import allocate_ranks, factorize, truncation_spectrum
from ..methods.rtn import rtn_quantize
from ..nn.lowrank_linear import LowRankLinear
from ..nn.quant_linear import QuantLinear
from ..quant.layout import packed_shapes
from .config import LowRankConfig
from .modules import float_weight, iter_linears, linear_shape, set_submodule
from .quantizer import CalibrateAfterLoading, CompressedHfQuantizer

logger = logging.get_logger(__name__)


def rank_key(model: nn.Module, name: str) -> str:
    """A linear's name under the base model (``layers.0.mlp.up_proj``), as ``LowRankConfig.ranks`` lists it, so the
    same ranks apply whichever head class loads the checkpoint."""
    prefix = f"{model.base_model_prefix}."
    return name[len(prefix):] if name.startswith(prefix) else name


class LowRankHfQuantizer(CalibrateAfterLoading, CompressedHfQuantizer):
    quantization_config: LowRankConfig
    layer_types = (LowRankLinear,)

    @property
    def calibrates(self) -> bool:
        cfg = self.quantization_config
        return not self.pre_quantized and (cfg.needs_calibration or cfg.allocates)

    def layer_for_name(self, model, name, module, device=None):
        return self.layer_for(module, device=device, name=rank_key(model, name))

    def layer_for(self, module: nn.Module, device=None, name: str | None = None) -> LowRankLinear:
        cfg = self.quantization_config
        in_f, out_f = linear_shape(module) or (module.in_features, module.out_features)
        rank = cfg.rank_for(in_f, out_f, name)
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
        target = f"rank={cfg.rank}" if cfg.rank else f"param_ratio={cfg.param_ratio}"
        return f"LowRankConfig(method={cfg.method}, {target}{', per-layer ranks' if cfg.ranks else ''})"

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

    def factorized_layer(self, model, name: str, linear: nn.Module, H: torch.Tensor | None) -> tuple[LowRankLinear, torch.Tensor]:
        """``(the LowRankLinear of linear, its weight as stored)`` by the config's method (``H``: GPTQ's Hessian)."""
        cfg = self.quantization_config
        weight = float_weight(linear).detach()
        layer = self.layer_for(linear, device=weight.device, name=rank_key(model, name))
        up, down = factorize(weight, layer.rank, cfg.method, H, alpha=cfg.alpha, damp_percent=cfg.damp_percent)
        layer.load_state_dict(self.factor_tensors(up, down, weight.dtype), strict=False, assign=True)
        if linear.bias is not None:
            layer.bias = nn.Parameter(linear.bias.detach().clone(), requires_grad=False)
        return layer, layer.dequantize_weight().to(weight.dtype)

    def allocate(self, model, windows) -> dict[str, int]:
        """Per-layer ranks for ``rank_allocation="sensitivity"``, from every layer's spectrum before any is factorised."""
        from .layerwise import observe_layerwise

        cfg = self.quantization_config
        spectra: dict[str, tuple[torch.Tensor, int, int]] = {}

        def observe(i, name, linear, gptq):
            in_f, out_f = linear_shape(linear)
            H = None if gptq is None else gptq.H
            s = truncation_spectrum(float_weight(linear).detach(), cfg.method, H, alpha=cfg.alpha, damp_percent=cfg.damp_percent)
            spectra[rank_key(model, name)] = (s.cpu(), in_f, out_f)

        if windows is None:  # svd: the weights alone
            for name, linear in iter_linears(model, self.modules_to_not_convert):
                if linear.weight.device.type == "meta":
                    raise ValueError(
                        f"{name}: its weight is offloaded (device_map), and rank_allocation='sensitivity' with method='svd' "
                        "reads every weight before factorising any: load the model without offload, or use method='whiten' "
                        "or 'asvd', which run block by block"
                    )
                observe(None, name, linear, None)
        else:
            observe_layerwise(model, windows, make_observer=lambda linears: GPTQ(linear_shape(linears[0])[0]), observe=observe,
                              skip=self.modules_to_not_convert, desc=f"low-rank {cfg.method} spectra")
        ranks = allocate_ranks(spectra, cfg.param_ratio)
        kept = sum(r * (i + o) for (_, i, o), r in zip(spectra.values(), ranks.values(), strict=True))
        logger.info("low-rank %s: ranks allocated by sensitivity to %d layers (%d to %d), %.3f of their weights kept",
                    cfg.method, len(ranks), min(ranks.values()), max(ranks.values()),
                    kept / sum(i * o for _, i, o in spectra.values()))
        return ranks

    def calibrate(self, model) -> dict[str, float]:
        """Allocate ranks if asked, then factorise every convertible linear; returns each layer's relative output error
        (relative weight error for svd)."""
        from .calibration import calibration_tokens
        from .layerwise import compress_layerwise

        cfg = self.quantization_config
        windows = calibration_tokens(model, cfg) if cfg.needs_calibration else None
        errors: dict[str, float] = {}
        was_training = model.training
        model.eval()
        if cfg.allocates:
            cfg.ranks = self.allocate(model, windows)
        if windows is None:  # svd with allocated ranks: no data, the layers one after another
            done = {}
            for name, linear in list(iter_linears(model, self.modules_to_not_convert)):
                done[name], approx = self.factorized_layer(model, name, linear, None)
                weight = float_weight(linear).detach()
                errors[name] = ((weight - approx).norm() / weight.norm().clamp(min=1e-30)).item()
                set_submodule(model, name, done[name])
        else:
            def compress(name, linear, gptq):
                layer, approx = self.factorized_layer(model, name, linear, gptq.H)
                errors[name] = relative_output_error(float_weight(linear).detach(), approx, gptq.H)
                linear.weight.data.copy_(approx.t() if type(linear).__name__ == "Conv1D" else approx)
                return layer

            done = compress_layerwise(
                model, windows, make_observer=lambda linears: GPTQ(linear_shape(linears[0])[0]), compress=compress,
                skip=self.modules_to_not_convert, true_sequential=cfg.true_sequential, desc=f"low-rank {cfg.method}",
            )
        model.train(was_training)
        self.keep_uncalibrated_float(model, done, f"low-rank {cfg.method}")
        logger.info("low-rank %s factorised %d linear layers; relative %s error mean %.3g", cfg.method, len(errors),
                    "weight" if windows is None else "output", sum(errors.values()) / max(1, len(errors)))
        model.hf_compress_layer_errors = errors
        return errors
