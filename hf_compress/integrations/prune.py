"""The pruning quantizers: magnitude (on load), Wanda and SparseGPT (calibrated block by block after loading).

Every pruned linear becomes a :class:`SparseLinear` (bitmask + kept values); SparseGPT with ``bits`` writes a
:class:`QuantLinear` (the GPTQ layout) instead. The calibrated methods run on the layer-wise driver GPTQ uses
(one block on the compute device at a time) with their own observer: the GPTQ Hessian for SparseGPT, input
norms for Wanda.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers.utils import logging

from ..methods.magnitude import magnitude_mask
from ..methods.owl import outlier_ratio, owl_sparsities
from ..methods.sparsegpt import SparseGPT
from ..methods.wanda import WandaStats, wanda_mask
from ..nn.quant_linear import QuantLinear
from ..nn.sparse_linear import SparseLinear
from ..quant.sparse import check_pattern, pack_bitmask
from .config import MagnitudePruneConfig, PruneConfig, SparseGPTConfig, WandaConfig
from .modules import float_weight, iter_linears, linear_shape
from .quantizer import CalibrateAfterLoading, CompressedHfQuantizer, WeightOnlyHfQuantizer, stored_entry

logger = logging.get_logger(__name__)


def kept_per_row(in_features: int, cfg: PruneConfig) -> int:
    """Weights a row keeps under a per-row target (magnitude, Wanda): ``in - int(in * sparsity)``, or ``in * N/M``."""
    nm = cfg.nm
    return in_features // nm[1] * nm[0] if nm else in_features - int(in_features * cfg.sparsity)


class PruneHfQuantizer(CompressedHfQuantizer):
    """Shared by the pruning methods: SparseLinear layers sized from the checkpoint on reload."""

    quantization_config: PruneConfig
    layer_types = (SparseLinear,)

    def layer_for(self, module: nn.Module, device=None, kept: int | None = None) -> SparseLinear:
        in_f, out_f = linear_shape(module) or (module.in_features, module.out_features)
        return SparseLinear(
            in_f, out_f, out_f * kept_per_row(in_f, self.quantization_config) if kept is None else kept,
            bias=module.bias is not None, dtype=module.weight.dtype, device=device,
            source_is_conv1d=type(module).__name__ == "Conv1D", pattern=self.quantization_config.nm,
        )

    def expected_tensors(self, module):
        return {"values": (tuple(module.values.shape), None), "bitmask": (tuple(module.bitmask.shape), "U8")}

    def describe_config(self) -> str:
        cfg = self.quantization_config
        return f"{type(cfg).__name__}({'pattern=' + cfg.pattern if cfg.pattern else f'sparsity={cfg.sparsity}'})"

    def fit_to_checkpoint(self, model, header):
        # SparseGPT's per-block masks keep a data-dependent number of weights per layer: take it from the file.
        for name, module in model.named_modules():
            if isinstance(module, SparseLinear):
                entry = stored_entry(header, model, name, "values")
                if entry is not None and len(entry[0]) == 1:
                    module._buffers["values"] = torch.empty(entry[0][0], dtype=module.values.dtype, device="meta")

    def _process_model_before_weight_loading(self, model, checkpoint_files=None, **kwargs):
        if not self.pre_quantized and self.quantization_config.nm is not None:
            # refuse before any weight is read or calibration runs
            skip = self.get_modules_to_not_convert(
                model, self.quantization_config.modules_to_not_convert, model._keep_in_fp32_modules, add_default_skips=True
            )
            for name, module in iter_linears(model, skip):
                try:
                    check_pattern(*self.quantization_config.nm, linear_shape(module)[0])
                except ValueError as e:
                    raise ValueError(f"{name}: {e}") from None
        return super()._process_model_before_weight_loading(model, checkpoint_files=checkpoint_files, **kwargs)


class MagnitudePruneHfQuantizer(PruneHfQuantizer):
    """Magnitude pruning as each float weight loads (no calibration)."""

    quantization_config: MagnitudePruneConfig

    def quantized_tensors(self, name, weight, module):
        cfg = self.quantization_config
        mask = magnitude_mask(weight, cfg.sparsity, cfg.nm)
        return {"values": weight[mask].to(module.values.dtype), "bitmask": pack_bitmask(mask)}


class CalibratedPruneHfQuantizer(CalibrateAfterLoading, PruneHfQuantizer):
    """Wanda and SparseGPT: the float model loads as usual, then each block is calibrated and pruned in turn."""

    method_name = ""

    def make_observer(self, in_features: int):
        raise NotImplementedError

    def prune_weight(self, weight: torch.Tensor, observer, sparsity: float) -> tuple[torch.Tensor, torch.Tensor, object]:
        """``(pruned weight [out, in], keep-mask, quantized weight or None)`` at ``sparsity`` (or the config's pattern)."""
        raise NotImplementedError

    def owl_schedule(self, model, windows) -> dict[int, float]:
        """``{block index: sparsity}`` from OWL's outlier ratios of the unpruned model (one extra pass)."""
        from .layerwise import observe_layerwise

        cfg = self.quantization_config
        scores: dict[int, list[torch.Tensor]] = {}
        ratios: dict[int, float] = {}

        def finish(keep: int | None = None) -> None:  # blocks run in order: a block is complete once the next starts
            for j in [j for j in scores if j != keep]:
                ratios[j] = outlier_ratio(scores.pop(j), cfg.owl_m)

        def observe(i, name, linear, stats):
            finish(keep=i)
            weight = float_weight(linear).detach().float()
            scores.setdefault(i, []).append((weight.abs() * stats.norms().to(weight.device)[None, :]).cpu())

        observe_layerwise(model, windows, make_observer=lambda linears: WandaStats(linear_shape(linears[0])[0]),
                          observe=observe, skip=self.modules_to_not_convert, desc="OWL outlier ratios")
        finish()
        order = sorted(ratios)
        schedule = dict(zip(order, owl_sparsities([ratios[i] for i in order], cfg.sparsity, cfg.owl_lambda), strict=True))
        logger.info("OWL: outlier ratios %s -> block sparsities %s", [round(ratios[i], 4) for i in order],
                    [round(schedule[i], 3) for i in order])
        return schedule

    def compressed_layer(self, linear, pruned, mask, quantized) -> nn.Module:
        layer = self.layer_for(linear, device=pruned.device, kept=int(mask.sum()))
        layer.load_sparse(pruned, mask, bias=linear.bias)
        return layer

    def calibrate(self, model) -> dict[str, float]:
        """Calibrate and prune every convertible linear; returns each layer's kept fraction."""
        from .calibration import calibration_tokens
        from .layerwise import block_index, compress_layerwise, find_blocks

        cfg = self.quantization_config
        windows = calibration_tokens(model, cfg)
        kept: dict[str, float] = {}
        was_training = model.training
        model.eval()
        schedule = self.owl_schedule(model, windows) if cfg.schedule == "owl" else None
        prefix, _ = find_blocks(model)

        def compress(name, linear, observer):
            weight = float_weight(linear).detach()
            sparsity = cfg.sparsity if schedule is None else schedule[block_index(prefix, name)]
            try:
                pruned, mask, quantized = self.prune_weight(weight, observer, sparsity)
            except ValueError as e:
                raise ValueError(f"{name}: {e}") from None
            kept[name] = mask.float().mean().item()
            # the next linears and blocks must see this layer as it will run: pruned
            linear.weight.data.copy_(pruned.t() if type(linear).__name__ == "Conv1D" else pruned)
            return self.compressed_layer(linear, pruned, mask, quantized)

        done = compress_layerwise(
            model, windows, make_observer=lambda linears: self.make_observer(linear_shape(linears[0])[0]),
            compress=compress, skip=self.modules_to_not_convert, true_sequential=cfg.true_sequential,
            desc=self.method_name, reuse_stable=True,  # compress changes only the linear it prunes
        )
        model.train(was_training)
        self.keep_uncalibrated_float(model, done, self.method_name)
        logger.info("%s pruned %d linear layers; %.1f%% of their weights kept", self.method_name, len(kept),
                    100 * sum(kept.values()) / max(1, len(kept)))
        return kept


class WandaHfQuantizer(CalibratedPruneHfQuantizer):
    quantization_config: WandaConfig
    method_name = "Wanda"

    def make_observer(self, in_features):
        return WandaStats(in_features)

    def prune_weight(self, weight, observer, sparsity):
        mask = wanda_mask(weight, observer, sparsity, self.quantization_config.nm)
        return weight * mask, mask, None


class SparseGPTHfQuantizer(CalibratedPruneHfQuantizer):
    """SparseGPT; with ``bits``, pruned and quantized in one pass into QuantLinear layers (the GPTQ layout)."""

    quantization_config: SparseGPTConfig
    method_name = "SparseGPT"
    scale_dtype = torch.float16  # as GPTQ's checkpoints

    @property
    def layer_types(self):
        return (QuantLinear,) if self.quantization_config.bits is not None else (SparseLinear,)

    def layer_for(self, module, device=None, kept=None):
        if self.quantization_config.bits is not None:
            return WeightOnlyHfQuantizer.layer_for(self, module, device)
        return super().layer_for(module, device, kept)

    def expected_tensors(self, module):
        if self.quantization_config.bits is not None:
            return WeightOnlyHfQuantizer.expected_tensors(self, module)
        return super().expected_tensors(module)

    def compressed_layer(self, linear, pruned, mask, quantized):
        if quantized is None:
            return super().compressed_layer(linear, pruned, mask, quantized)
        layer = self.layer_for(linear, device=pruned.device)
        layer.load_quantized(quantized, bias=linear.bias)
        return layer

    def make_observer(self, in_features):
        return SparseGPT(in_features)

    def prune_weight(self, weight, observer, sparsity):
        cfg = self.quantization_config
        r = observer.prune(
            weight, sparsity, cfg.nm, bits=cfg.bits, group_size=cfg.group_size, sym=cfg.sym,
            damp_percent=cfg.damp_percent, block_size=cfg.block_size,
            scale_dtype=self.scale_dtype if cfg.bits is not None else None, refit_steps=cfg.refit_steps,
            observer=cfg.observer,
        )
        return r.weight, r.mask, r.quantized
