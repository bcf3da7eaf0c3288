"""Quantization configs: ``QuantizationConfigMixin`` subclasses, validated, versioned, JSON round-trippable.

Each config declares its serialized fields (written to ``config.json``) and its runtime-only fields
(calibration datasets, tokenizers: accepted as arguments, never written). Unknown fields are an error, so
a typo or a checkpoint from an incompatible version fails loudly instead of being ignored.
"""

from __future__ import annotations

import copy
from typing import Any, ClassVar

from transformers.utils.quantization_config import QuantizationConfigMixin

from ..methods.rtn import check_observer
from ..quant.layout import LAYOUT_BITS
from ..quant.observers import OBSERVERS

# 1: zero codes stored exactly (gptq_v2); 2: adds ``checkpoint_format``, default "gptq" (v1: zero - 1).
FORMAT_VERSION = 2
CHECKPOINT_FORMATS = ("gptq", "gptq_v2")
_META_FIELDS = ("quant_method", "format_version")


class HfCompressConfig(QuantizationConfigMixin):
    """Base of every hf_compress config. Subclasses set ``quant_method``, ``fields`` and ``runtime_fields``."""

    quant_method: ClassVar[str]
    fields: ClassVar[dict[str, Any]] = {}  # serialized field -> default
    runtime_fields: ClassVar[dict[str, Any]] = {}  # runtime-only field -> default

    def __init__(self, **kwargs):
        unknown = sorted(set(kwargs) - set(self.fields) - set(self.runtime_fields) - set(_META_FIELDS))
        if unknown:
            raise ValueError(
                f"unknown field(s) {unknown} for {type(self).__name__}; valid fields: {sorted(self.fields) + sorted(self.runtime_fields)}"
            )
        qm = kwargs.pop("quant_method", self.quant_method)
        if qm != self.quant_method:
            raise ValueError(f"{type(self).__name__} has quant_method {self.quant_method!r}, got {qm!r}")
        version = kwargs.pop("format_version", FORMAT_VERSION)
        if not isinstance(version, int) or version > FORMAT_VERSION:
            raise ValueError(
                f"this checkpoint uses hf_compress format_version {version}, newer than this install supports "
                f"({FORMAT_VERSION}): upgrade hf-compress (pip install -U hf-compress)"
            )
        self.format_version = version
        for name, default in {**self.fields, **self.runtime_fields}.items():
            setattr(self, name, copy.deepcopy(kwargs.get(name, default)))
        self.post_init()

    def post_init(self) -> None:
        """Validate fields; subclasses extend."""

    def to_dict(self) -> dict[str, Any]:
        d = {"quant_method": self.quant_method, "format_version": self.format_version}
        d.update({name: copy.deepcopy(getattr(self, name)) for name in self.fields})
        return d

    def __iter__(self):
        yield from self.to_dict().items()

    def __eq__(self, other) -> bool:
        return type(self) is type(other) and self.to_dict() == other.to_dict()

    def update(self, **kwargs):
        unused = super().update(**kwargs)
        self.post_init()
        return unused

    @classmethod
    def from_dict(cls, config_dict, return_unused_kwargs=False, **kwargs):
        config = cls(**config_dict)
        unused = config.update(**kwargs)
        return (config, unused) if return_unused_kwargs else config


def check_bits_and_group(bits, group_size) -> None:
    if not isinstance(bits, int) or isinstance(bits, bool) or bits not in LAYOUT_BITS:
        raise ValueError(f"bits must be one of {list(LAYOUT_BITS)}, got {bits!r}")
    if not isinstance(group_size, int) or isinstance(group_size, bool) or (group_size != -1 and group_size <= 0):
        raise ValueError(
            f"group_size must be -1 (one scale per output channel) or a positive integer, got {group_size!r}"
        )


def check_module_list(value, name: str) -> None:
    if value is not None and (not isinstance(value, list) or not all(isinstance(v, str) for v in value)):
        raise ValueError(f"{name} must be a list of module names (strings) or None, got {value!r}")


def check_type(value, types, name: str, what: str) -> None:
    if not isinstance(value, types) or (isinstance(value, bool) and bool not in types):
        raise ValueError(f"{name} must be {what}, got {value!r}")


CALIBRATION_FIELDS = {"n_samples": 128, "seqlen": None, "seed": 0}
CALIBRATION_RUNTIME_FIELDS = {"dataset": None, "tokenizer": None}


def check_calibration_fields(cfg) -> None:
    """``n_samples``/``seqlen``/``seed`` of a config that calibrates (GPTQ, static W8A8, SmoothQuant)."""
    check_type(cfg.n_samples, (int,), "n_samples", "a positive integer")
    if cfg.n_samples < 1:
        raise ValueError(f"n_samples must be a positive integer, got {cfg.n_samples!r}")
    if cfg.seqlen is not None:
        check_type(cfg.seqlen, (int,), "seqlen", "a positive integer or None")
        if cfg.seqlen < 1:
            raise ValueError(f"seqlen must be a positive integer or None, got {cfg.seqlen!r}")
    check_type(cfg.seed, (int,), "seed", "an integer")


def check_hessian_fields(cfg) -> None:
    """``damp_percent`` and ``block_size`` of a config solving on the GPTQ Hessian (GPTQ, SparseGPT)."""
    check_type(cfg.damp_percent, (int, float), "damp_percent", "a number in [0, 1)")
    if not 0 <= cfg.damp_percent < 1:
        raise ValueError(f"damp_percent must be in [0, 1), got {cfg.damp_percent!r}")
    check_type(cfg.block_size, (int,), "block_size", "a positive integer")
    if cfg.block_size < 1:
        raise ValueError(f"block_size must be a positive integer, got {cfg.block_size!r}")


class WeightOnlyConfig(HfCompressConfig):
    """Fields shared by the weight-only methods that write the packed GPTQ layout (RTN, GPTQ).

    ``checkpoint_format`` says how ``qzeros`` are stored on disk: ``"gptq"`` (the v1 convention the serving
    ecosystem reads: zero code - 1) or ``"gptq_v2"`` (the zero code itself). In memory they are always exact.
    """

    fields = {"bits": 4, "group_size": -1, "sym": True, "modules_to_not_convert": None, "checkpoint_format": "gptq",
              "observer": "minmax"}

    def __init__(self, **kwargs):
        if "checkpoint_format" not in kwargs and kwargs.get("format_version", FORMAT_VERSION) < 2:
            kwargs["checkpoint_format"] = "gptq_v2"  # format 1 stored exact zero codes
        super().__init__(**kwargs)

    def post_init(self) -> None:
        check_bits_and_group(self.bits, self.group_size)
        check_type(self.sym, (bool,), "sym", "True or False")
        check_module_list(self.modules_to_not_convert, "modules_to_not_convert")
        if self.checkpoint_format not in CHECKPOINT_FORMATS:
            raise ValueError(f"checkpoint_format must be one of {list(CHECKPOINT_FORMATS)}, got {self.checkpoint_format!r}")
        check_observer(self.observer)


class RTNConfig(WeightOnlyConfig):
    """Round-to-nearest weight-only quantization.

    Args:
        bits: 2, 3, 4 or 8.
        group_size: -1 (default) for one scale per output channel, else the number of input columns that
            share a scale (the last group is shorter when it does not divide the input width).
        sym: symmetric (absmax, zero code at the midpoint) or asymmetric (min/max with a zero point).
        modules_to_not_convert: module names (or name suffixes) kept in float, in addition to the output
            embeddings and tied weights that are always kept.
        observer: each group's range: ``"minmax"`` (default, plain RTN) or ``"mse"``: the min/max range shrunk by
            the factor in 1, 0.99, ..., 0.80 with the least squared rounding error of the group.
    """

    quant_method = "hf_compress_rtn"


class GPTQConfig(WeightOnlyConfig):
    """GPTQ: Hessian-based post-training weight quantization, calibrated layer by layer.

    Args (written to ``config.json``):
        bits, group_size, sym, modules_to_not_convert, checkpoint_format: as :class:`RTNConfig`.
        observer: as :class:`RTNConfig`, applied to each group as GPTQ reaches it (its columns already carry the
            earlier columns' error); default ``"mse"`` (``"minmax"`` is the reference GPTQ's).
        desc_act: act-order, quantize columns in order of decreasing Hessian diagonal (``g_idx`` then maps
            columns to groups out of order).
        static_groups: with ``desc_act``, take every group's scale/zero from the weights before any update,
            so groups stay contiguous in the original column order.
        damp_percent: dampening added to the Hessian diagonal, as a fraction of its mean (default 0.01).
        true_sequential: within a block, quantize the linears in the order they run (q/k/v, then o, then
            up/gate, then down), recomputing inputs after each group.
        n_samples, seqlen, seed: ``n_samples`` random windows of ``seqlen`` tokens drawn from the
            calibration data under ``seed``; ``seqlen=None`` takes min(2048, the model's positions).
        block_size: columns per lazy-batch update (128).
    Runtime only (never written):
        dataset: calibration data: a list of strings, a ``datasets.Dataset`` with a text column, a local
            text file path, or token ids (a ``[n, seqlen]`` tensor or a list of 1-D tensors).
        tokenizer: a tokenizer or its path (default: the model's own folder).
    """

    quant_method = "hf_compress_gptq"
    fields = {
        **WeightOnlyConfig.fields,
        "observer": "mse",
        "desc_act": False,
        "static_groups": False,
        "damp_percent": 0.01,
        "true_sequential": True,
        **CALIBRATION_FIELDS,
        "block_size": 128,
    }
    runtime_fields = CALIBRATION_RUNTIME_FIELDS

    def post_init(self) -> None:
        super().post_init()
        for name in ("desc_act", "static_groups", "true_sequential"):
            check_type(getattr(self, name), (bool,), name, "True or False")
        check_hessian_fields(self)
        check_calibration_fields(self)


class Int8MixedConfig(HfCompressConfig):
    """LLM.int8 (mixed-precision int8): weights int8 per output row (absmax), activations int8 per token at run
    time, except outlier input features (any ``|x| >= threshold`` in the batch), which run in float.

    Args:
        threshold: the outlier magnitude (> 0; 6.0 as in the paper and bitsandbytes). For int8 activations
            without outlier handling use :class:`W8A8Config`.
        modules_to_not_convert: module names (or name suffixes) kept in float, besides the output embeddings.
    """

    quant_method = "hf_compress_int8"
    fields = {"threshold": 6.0, "modules_to_not_convert": None}

    def post_init(self) -> None:
        check_type(self.threshold, (int, float), "threshold", "a number > 0")
        if not self.threshold > 0:
            raise ValueError(
                f"threshold must be > 0 (the outlier magnitude, 6.0 in LLM.int8), got {self.threshold!r}; "
                "for pure int8 activations without outlier columns use W8A8Config"
            )
        check_module_list(self.modules_to_not_convert, "modules_to_not_convert")


W8A8_MODES = ("dynamic", "static")
ACT_GRANULARITIES = ("per-token", "per-tensor")


class W8A8Config(HfCompressConfig):
    """W8A8: int8 weights (per output row) and int8 activations.

    Args (written to ``config.json``):
        mode: ``"dynamic"`` (activation scales computed at run time) or ``"static"`` (one activation scale per
            layer, fixed from calibration data).
        act_granularity: ``"per-token"`` or ``"per-tensor"``; default per-token for dynamic, per-tensor for
            static (the only static choice: a per-token scale cannot be known ahead of time).
        observer: how static scales are chosen from the calibration activations: ``minmax``,
            ``moving-average``, ``percentile``, ``mse`` or ``kl``.
        smooth_alpha: SmoothQuant migration strength in [0, 1] (0.5 typical), or None for no smoothing.
            Smoothing needs calibration data (the activations' per-channel ranges), in both modes.
        modules_to_not_convert, n_samples, seqlen, seed: as :class:`GPTQConfig`.
    Runtime only (never written): dataset, tokenizer, as :class:`GPTQConfig`.
    """

    quant_method = "hf_compress_w8a8"
    fields = {
        "mode": "dynamic",
        "act_granularity": None,
        "observer": "minmax",
        "smooth_alpha": None,
        "modules_to_not_convert": None,
        **CALIBRATION_FIELDS,
    }
    runtime_fields = CALIBRATION_RUNTIME_FIELDS

    def post_init(self) -> None:
        if self.mode not in W8A8_MODES:
            raise ValueError(f"mode must be one of {list(W8A8_MODES)}, got {self.mode!r}")
        if self.act_granularity is None:
            self.act_granularity = "per-token" if self.mode == "dynamic" else "per-tensor"
        if self.act_granularity not in ACT_GRANULARITIES:
            raise ValueError(f"act_granularity must be one of {list(ACT_GRANULARITIES)}, got {self.act_granularity!r}")
        if self.mode == "static" and self.act_granularity != "per-tensor":
            raise ValueError(
                "static activation scales are per tensor (a per-token scale cannot be fixed ahead of time): "
                "use act_granularity='per-tensor' with mode='static', or mode='dynamic' for per-token scales"
            )
        names = [n for n in OBSERVERS if n != "histogram"]
        if self.observer not in names:
            raise ValueError(f"observer must be one of {names}, got {self.observer!r}")
        if self.smooth_alpha is not None:
            check_type(self.smooth_alpha, (int, float), "smooth_alpha", "a number in [0, 1] or None")
            if not 0 <= self.smooth_alpha <= 1:
                raise ValueError(f"smooth_alpha must be in [0, 1] (0.5 is typical), got {self.smooth_alpha!r}")
        check_module_list(self.modules_to_not_convert, "modules_to_not_convert")
        check_calibration_fields(self)

    @property
    def needs_calibration(self) -> bool:
        return self.mode == "static" or self.smooth_alpha is not None


LOWBIT_MODES = ("training", "inference")


def check_lowbit_common(cfg) -> None:
    if cfg.mode not in LOWBIT_MODES:
        raise ValueError(
            f"mode must be 'training' (latent float weights, quantized in the forward: trainable) or 'inference' "
            f"(packed weights), got {cfg.mode!r}"
        )
    check_module_list(cfg.modules_to_not_convert, "modules_to_not_convert")


class BitLinearConfig(HfCompressConfig):
    """BitNet linear layers: 1.58-bit (ternary, absmean) or 1-bit (sign) weights, int8 per-token activations.

    (Named so because transformers' ``BitNetConfig`` is the BitNet *model* config.)

    Args:
        bits: 1.58 (ternary {-1, 0, 1}, BitNet b1.58) or 1 (binary {-1, +1}, BitNet).
        mode: ``"training"``: every linear becomes a trainable :class:`~hf_compress.nn.bitlinear.BitLinear` over
            its float weight (quantization-aware training; ``Trainer`` accepts the model); ``"inference"``: the
            weights are quantized and packed on load (2 bits or 1 bit each), and a saved model reloads packed.
        per_channel: one scale per output row instead of one per tensor.
        sub_ln: an RMSNorm on each linear's input before activation quantization (BitNet's SubLN).
        warmup_steps: training mode: the quantization strength λ rises from 0 to 1 over this many steps (with
            :class:`~hf_compress.BitLinearWarmup` in the trainer's callbacks); 0 = quantized from the start.
        modules_to_not_convert: module names kept in float, besides the output embeddings.
    """

    quant_method = "hf_compress_bitlinear"
    fields = {"bits": 1.58, "mode": "inference", "per_channel": False, "sub_ln": False, "warmup_steps": 0,
              "modules_to_not_convert": None}

    def post_init(self) -> None:
        if isinstance(self.bits, bool) or self.bits not in (1, 1.58):
            raise ValueError(f"bits must be 1.58 (ternary) or 1 (binary) for BitLinearConfig, got {self.bits!r}")
        self.bits = 1.58 if self.bits == 1.58 else 1
        check_lowbit_common(self)
        for name in ("per_channel", "sub_ln"):
            check_type(getattr(self, name), (bool,), name, "True or False")
        check_type(self.warmup_steps, (int,), "warmup_steps", "an integer >= 0")
        if self.warmup_steps < 0:
            raise ValueError(f"warmup_steps must be >= 0, got {self.warmup_steps}")


SVID_METHODS = ("svd", "power")


class OneBitConfig(HfCompressConfig):
    """OneBit: 1-bit sign weights with two value vectors, W ≈ sign(W) ⊙ (h gᵀ), initialised by SVID.

    Args:
        mode: ``"training"`` (trainable :class:`~hf_compress.nn.bitlinear.OneBitLinear`: latent weight whose sign
            is used, g and h trained; distil it with the float model as teacher) or ``"inference"`` (packed, 1 bit
            per weight plus the two vectors).
        svid: how the rank-1 approximation of |W| is found: ``"svd"`` or ``"power"`` iteration.
        layernorm: the LayerNorm without affine parameters the OneBit paper's code applies to each layer's output
            (off by default: distilling pydoc-llama-6m for 200 steps, 58.3 held-out perplexity with it against 46.0
            without; the SVID start is 1119 with it and 82.6 without).
        modules_to_not_convert: as :class:`BitLinearConfig`.
    """

    quant_method = "hf_compress_onebit"
    fields = {"mode": "inference", "svid": "svd", "layernorm": False, "modules_to_not_convert": None}

    def post_init(self) -> None:
        check_lowbit_common(self)
        if self.svid not in SVID_METHODS:
            raise ValueError(f"svid must be one of {list(SVID_METHODS)}, got {self.svid!r}")
        check_type(self.layernorm, (bool,), "layernorm", "True or False")


QAT_WEIGHT_OBSERVERS = ("minmax", "mse", "percentile")
QAT_ACT_MODES = ("dynamic", "static")


class QATConfig(HfCompressConfig):
    """Quantization-aware training: every linear becomes a :class:`~hf_compress.nn.qat_linear.FakeQuantLinear` that
    trains its float weight through the rounding it will be stored with; :func:`hf_compress.convert_qat` then packs it.

    Args:
        bits: weight bits, 2, 3, 4 or 8.
        group_size, sym: as :class:`RTNConfig` (the packed layer the model converts to).
        observer: how the initial weight ranges are chosen: ``minmax`` (the start equals RTN exactly), ``mse`` or
            ``percentile`` (see :mod:`hf_compress.quant.observers`).
        learn_scales: train the scales and zero points with the weights (LSQ / LSQ+); False keeps the observer's.
        activations: None (weight-only: converts to :class:`RTNConfig`'s ``QuantLinear``), ``"dynamic"`` (int8
            per-token activations) or ``"static"`` (one learned int8 activation scale per layer); both convert to
            :class:`W8A8Config`'s ``W8A8Linear`` and need ``bits=8, group_size=-1, sym=True``.
        modules_to_not_convert: module names kept in float, besides the output embeddings.
    """

    quant_method = "hf_compress_qat"
    fields = {"bits": 4, "group_size": 128, "sym": False, "observer": "minmax", "learn_scales": True,
              "activations": None, "modules_to_not_convert": None}

    def post_init(self) -> None:
        check_bits_and_group(self.bits, self.group_size)
        for name in ("sym", "learn_scales"):
            check_type(getattr(self, name), (bool,), name, "True or False")
        if self.observer not in QAT_WEIGHT_OBSERVERS:
            raise ValueError(f"observer must be one of {list(QAT_WEIGHT_OBSERVERS)}, got {self.observer!r}")
        if self.activations is not None:
            if self.activations not in QAT_ACT_MODES:
                raise ValueError(f"activations must be None, 'dynamic' or 'static', got {self.activations!r}")
            if (self.bits, self.group_size, self.sym) != (8, -1, True):
                raise ValueError(
                    "int8 activations convert to W8A8Linear, whose weights are 8-bit symmetric per output row: use "
                    f"bits=8, group_size=-1, sym=True with activations={self.activations!r} (got bits={self.bits}, "
                    f"group_size={self.group_size}, sym={self.sym}), or activations=None for weight-only QAT"
                )
        check_module_list(self.modules_to_not_convert, "modules_to_not_convert")

    def target_config(self) -> HfCompressConfig:
        """The config of the packed model :func:`hf_compress.convert_qat` produces."""
        if self.activations is None:
            return RTNConfig(bits=self.bits, group_size=self.group_size, sym=self.sym,
                             modules_to_not_convert=copy.deepcopy(self.modules_to_not_convert))
        return W8A8Config(mode=self.activations, modules_to_not_convert=copy.deepcopy(self.modules_to_not_convert))


SPARSITY_SCHEDULES = ("uniform", "owl")
RANK_ALLOCATIONS = ("uniform", "sensitivity")


class PruneConfig(HfCompressConfig):
    """Fields shared by the pruning methods (magnitude, Wanda, SparseGPT).

    Args:
        sparsity: the fraction of each linear's weights removed, in [0, 1) (0.5 by default), counted per output
            row (magnitude, Wanda) or per block of columns (SparseGPT).
        pattern: ``"N:M"`` semi-structured sparsity instead: at most N weights kept in every M consecutive inputs
            (``"2:4"``, ``"4:8"``); ``sparsity`` then becomes ``1 - N/M``. Input widths must be multiples of M.
        modules_to_not_convert: module names (or name suffixes) kept dense, besides the output embeddings.
    """

    fields = {"sparsity": 0.5, "pattern": None, "modules_to_not_convert": None}

    def post_init(self) -> None:
        from ..quant.sparse import check_sparsity, parse_pattern

        if self.pattern is not None:
            n, m = parse_pattern(self.pattern)
            self.pattern = f"{n}:{m}"
            self.sparsity = 1 - n / m
        check_sparsity(self.sparsity)
        check_module_list(self.modules_to_not_convert, "modules_to_not_convert")

    @property
    def nm(self) -> tuple[int, int] | None:
        """The pattern as ``(N, M)``, or None for unstructured sparsity."""
        return None if self.pattern is None else tuple(int(v) for v in self.pattern.split(":"))


class MagnitudePruneConfig(PruneConfig):
    """Magnitude pruning on load: the smallest ``|W|`` of each row (or N:M group) removed. No calibration.

    Args: sparsity, pattern, modules_to_not_convert as :class:`PruneConfig`.
    """

    quant_method = "hf_compress_magnitude"


class WandaConfig(PruneConfig):
    """Wanda: prune by ``|W_ij| * ||X_j||`` within each output row, the input norms from calibration data, block by
    block (each block sees the pruned blocks before it).

    Args: sparsity, pattern, modules_to_not_convert as :class:`PruneConfig`; n_samples, seqlen, seed as
    :class:`GPTQConfig`; true_sequential: as :class:`GPTQConfig`, but off by default, as in the Wanda and SparseGPT
    papers (every linear of a block sees the block's unpruned inputs; on pydoc-llama-6m it is also the better choice:
    SparseGPT 50% 40.19 held-out perplexity against 40.22, Wanda 2:4 44.63 against 44.83).
        schedule: ``"uniform"`` (every block at ``sparsity``) or ``"owl"`` (outlier-weighted: blocks with more
            outlier Wanda scores keep more weights, the average sparsity unchanged; :mod:`hf_compress.methods.owl`;
            one extra calibration pass over the unpruned model). Unstructured sparsity only.
        owl_lambda: OWL's λ (0.08: the paper's): block sparsities span 2·λ around the target.
        owl_m: OWL's outlier threshold, as a multiple of the block's mean score (5.0: the paper's).
    Runtime only: dataset, tokenizer as :class:`GPTQConfig`.
    """

    quant_method = "hf_compress_wanda"
    fields = {**PruneConfig.fields, "true_sequential": False, "schedule": "uniform", "owl_lambda": 0.08, "owl_m": 5.0,
              **CALIBRATION_FIELDS}
    runtime_fields = CALIBRATION_RUNTIME_FIELDS

    def post_init(self) -> None:
        super().post_init()
        check_type(self.true_sequential, (bool,), "true_sequential", "True or False")
        if self.schedule not in SPARSITY_SCHEDULES:
            raise ValueError(f"schedule must be one of {list(SPARSITY_SCHEDULES)}, got {self.schedule!r}")
        if self.schedule == "owl" and self.pattern is not None:
            raise ValueError(
                f"schedule='owl' varies the sparsity per block, which the N:M pattern {self.pattern} fixes: use "
                "schedule='uniform' with a pattern, or sparsity=... with OWL"
            )
        check_type(self.owl_lambda, (int, float), "owl_lambda", "a number in [0, 0.5)")
        if not 0 <= self.owl_lambda < 0.5:
            raise ValueError(f"owl_lambda is half the span of the block sparsities and must be in [0, 0.5), got {self.owl_lambda!r}")
        if self.schedule == "owl" and not (self.sparsity - 2 * self.owl_lambda >= 0 and self.sparsity + 2 * self.owl_lambda < 1):
            raise ValueError(
                f"with owl_lambda={self.owl_lambda} a block's sparsity may lie up to {2 * self.owl_lambda:g} from {self.sparsity}, "
                "outside [0, 1): lower owl_lambda (or move sparsity away from 0 and 1)"
            )
        check_type(self.owl_m, (int, float), "owl_m", "a positive number")
        if self.owl_m <= 0:
            raise ValueError(f"owl_m (the outlier threshold, a multiple of the mean score) must be positive, got {self.owl_m!r}")
        check_calibration_fields(self)


class SparseGPTConfig(WandaConfig):
    """SparseGPT: OBS mask selection and weight update on the GPTQ Hessian, calibrated block by block; with
    ``bits`` it prunes and quantizes in the same pass and stores the GPTQ layout (pruned weights hold the zero
    code, so they dequantize to exactly 0; zero codes stored exactly, as ``gptq_v2``).

    Args: sparsity, pattern, modules_to_not_convert, true_sequential, schedule, owl_lambda, owl_m, n_samples, seqlen,
        seed as :class:`WandaConfig`;
        bits: None (prune only) or 2, 3, 4, 8 (prune + quantize); group_size, sym, observer: as :class:`RTNConfig`
            (with bits; ``"minmax"`` by default: ``"mse"`` would fit each group's range to weights the mask then
            zeroes, and on pydoc-llama-6m 50% + int4 g128 it scores 40.31 against min/max's 40.21);
        damp_percent, block_size: as :class:`GPTQConfig` (block_size must be a multiple of M for N:M).
        refit_steps: conjugate-gradient steps that refit the kept weights to the layer's calibration outputs
            after the OBS pass, the mask fixed (default 5, where the gain levels off; 0 is the paper's algorithm;
            ignored with ``bits``, whose weights stay on the quantization grid).
    Runtime only: dataset, tokenizer as :class:`GPTQConfig`.
    """

    quant_method = "hf_compress_sparsegpt"
    fields = {**WandaConfig.fields, "bits": None, "group_size": -1, "sym": True, "damp_percent": 0.01, "block_size": 128,
              "refit_steps": 5, "observer": "minmax"}

    def post_init(self) -> None:
        super().post_init()
        if self.bits is not None:
            check_bits_and_group(self.bits, self.group_size)
            check_type(self.sym, (bool,), "sym", "True or False")
        check_observer(self.observer)
        check_hessian_fields(self)
        check_type(self.refit_steps, (int,), "refit_steps", "a non-negative integer")
        if self.refit_steps < 0:
            raise ValueError(f"refit_steps must be a non-negative integer (0 turns the refit off), got {self.refit_steps!r}")
        nm = self.nm
        if nm is not None and (self.block_size % nm[1] or (self.bits is not None and self.group_size != -1 and self.group_size % nm[1])):
            raise ValueError(
                f"with pattern {self.pattern}, block_size ({self.block_size}) and group_size ({self.group_size}) must be "
                f"multiples of M={nm[1]} so that no N:M group straddles a block"
            )


class LowRankConfig(HfCompressConfig):
    """Low-rank factorisation: every linear ``W`` becomes ``up @ down`` (:class:`~hf_compress.nn.lowrank_linear.LowRankLinear`).

    Args (written to ``config.json``):
        method: ``"svd"`` (truncated SVD of W, on load, no calibration), ``"asvd"`` (activation-aware: input columns
            scaled by their calibration RMS^alpha before the SVD) or ``"whiten"`` (SVD in the space whitened by the
            Cholesky factor of the calibration Gram matrix: the truncation error equals the output error).
        param_ratio: the fraction of each linear's weights the factors keep, in (0, 1]: rank
            ``floor(ratio * m n / (m + n))``. Or:
        rank: one rank for every linear (at most min(in, out)). Give exactly one of the two.
        rank_allocation: with ``param_ratio``: ``"uniform"`` (every linear keeps that ratio) or ``"sensitivity"``
            (the ratio holds for all the linears together; each gets the rank that removes the most relative
            truncation error per parameter: :func:`~hf_compress.methods.lowrank.allocate_ranks`, on every layer's
            spectrum measured first, one extra calibration pass for asvd and whiten).
        ranks: ``{linear name: rank}`` (names under the base model, e.g. ``layers.0.mlp.down_proj``), overriding
            ``rank``/``param_ratio`` for those layers; filled in by ``rank_allocation="sensitivity"`` and written to
            ``config.json``, so a reload builds the same layers.
        alpha: asvd's exponent (0.5).
        damp_percent: whiten's damping of the Gram matrix, as a fraction of its mean diagonal (0.01).
        bits, group_size, sym: quantize the two factors with RTN too (None: float factors).
        modules_to_not_convert, true_sequential, n_samples, seqlen, seed: as :class:`GPTQConfig` (calibrated methods).
    Runtime only: dataset, tokenizer as :class:`GPTQConfig` (asvd and whiten).
    """

    quant_method = "hf_compress_lowrank"
    fields = {"method": "svd", "param_ratio": None, "rank": None, "rank_allocation": "uniform", "ranks": None, "alpha": 0.5, "damp_percent": 0.01, "bits": None,
              "group_size": -1, "sym": True, "modules_to_not_convert": None, "true_sequential": True, **CALIBRATION_FIELDS}
    runtime_fields = CALIBRATION_RUNTIME_FIELDS

    def post_init(self) -> None:
        from ..methods.lowrank import LOWRANK_METHODS

        if self.method not in LOWRANK_METHODS:
            raise ValueError(f"method must be one of {list(LOWRANK_METHODS)}, got {self.method!r}")
        if (self.param_ratio is None) == (self.rank is None):
            raise ValueError("give exactly one of param_ratio (fraction of each linear's weights kept, e.g. 0.8) or rank")
        if self.param_ratio is not None:
            check_type(self.param_ratio, (int, float), "param_ratio", "a number in (0, 1]")
            if not 0 < self.param_ratio <= 1:
                raise ValueError(f"param_ratio is the fraction of each linear's weights kept and must be in (0, 1], got {self.param_ratio!r}")
        if self.rank is not None:
            check_type(self.rank, (int,), "rank", "a positive integer")
            if self.rank <= 0:
                raise ValueError(f"rank must be a positive integer (at most min(in, out) of every layer), got {self.rank!r}")
        if self.rank_allocation not in RANK_ALLOCATIONS:
            raise ValueError(f"rank_allocation must be one of {list(RANK_ALLOCATIONS)}, got {self.rank_allocation!r}")
        if self.rank_allocation == "sensitivity" and self.param_ratio is None:
            raise ValueError("rank_allocation='sensitivity' shares a parameter budget across layers: give param_ratio, not rank")
        if self.ranks is not None and not (
            isinstance(self.ranks, dict)
            and all(isinstance(k, str) and isinstance(v, int) and not isinstance(v, bool) and v > 0 for k, v in self.ranks.items())
        ):
            raise ValueError(f"ranks must be a dict of linear name -> positive integer rank, or None; got {self.ranks!r}")
        check_type(self.alpha, (int, float), "alpha", "a number")
        check_type(self.damp_percent, (int, float), "damp_percent", "a number in [0, 1)")
        if not 0 <= self.damp_percent < 1:
            raise ValueError(f"damp_percent must be in [0, 1), got {self.damp_percent!r}")
        if self.bits is not None:
            check_bits_and_group(self.bits, self.group_size)
            check_type(self.sym, (bool,), "sym", "True or False")
        check_type(self.true_sequential, (bool,), "true_sequential", "True or False")
        check_module_list(self.modules_to_not_convert, "modules_to_not_convert")
        check_calibration_fields(self)

    @property
    def needs_calibration(self) -> bool:
        """Whether compressing needs calibration data (asvd, whiten)."""
        return self.method != "svd"

    @property
    def allocates(self) -> bool:
        """Whether the ranks are still to be allocated across layers (before any layer is factorised)."""
        return self.rank_allocation == "sensitivity" and self.ranks is None

    def rank_for(self, in_features: int, out_features: int, name: str | None = None) -> int:
        """The rank of a linear: ``ranks[name]`` if listed, else ``rank`` or the one ``param_ratio`` gives."""
        from ..methods.lowrank import check_rank, rank_for_ratio

        if self.ranks is not None and name in self.ranks:
            rank = self.ranks[name]
        else:
            rank = self.rank if self.rank is not None else rank_for_ratio(in_features, out_features, self.param_ratio)
        check_rank(rank, in_features, out_features)
        return rank
