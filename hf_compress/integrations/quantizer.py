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
from torch import nn
from transformers.core_model_loading import ConversionOps
from transformers.quantizers.base import HfQuantizer
from transformers.quantizers.quantizers_utils import get_module_from_name
from transformers.utils import logging

from ..methods.gptq import GPTQ, ROW_CHUNK
from ..methods.rtn import rtn_quantize
from ..nn.quant_linear import QuantLinear
from ..quant.layout import QuantizedWeight, packed_shapes, shift_zero_codes, unpack_qzeros
from .config import GPTQConfig, RTNConfig, WeightOnlyConfig
from .modules import float_weight, iter_linears, linear_shape, replace_linears, report_coverage, set_submodule

logger = logging.get_logger(__name__)


def safetensors_header(path: str) -> dict[str, tuple[list[int], str]]:
    """``{name: (shape, dtype)}`` from a safetensors header (reads only the header, never the data)."""
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
    return {k: (v["shape"], v["dtype"]) for k, v in header.items() if k != "__metadata__"}


def checkpoint_header(checkpoint_files) -> dict[str, tuple[list[int], str]]:
    """:func:`safetensors_header` of every safetensors shard, merged."""
    header = {}
    for f in checkpoint_files or ():
        if str(f).endswith(".safetensors") and os.path.isfile(f):
            header.update(safetensors_header(f))
    return header


def stored_entry(header: dict, model: nn.Module, module_name: str, tensor: str):
    """``(shape, dtype)`` of ``module_name.tensor`` in a checkpoint header (with or without the base-model
    prefix), or None."""
    keys = (f"{module_name}.{tensor}", f"{model.base_model_prefix}.{module_name}.{tensor}")
    return next((header[k] for k in keys if k in header), None)


FLOAT_DTYPES = ("F16", "BF16", "F32", "F64")


def release_checkpoint_map(model: nn.Module) -> None:
    """Copy the CPU tensors still backed by the checkpoint's memory map (safetensors loads them zero-copy, as
    storages that cannot be resized). While one of them lives the whole map stays, and with it, counted in the
    process's resident memory, the page of every float weight read while quantizing: 2.8 GB on the 1B-shaped Llama
    whose packed weights take 0.35 GB."""
    copies: dict[int, torch.Tensor] = {}  # tied tensors are copied once and stay tied
    for module in model.modules():
        for store in (module._parameters, module._buffers):
            for name, t in store.items():
                if t is None or t.device.type != "cpu" or t.untyped_storage().resizable():
                    continue
                if id(t) not in copies:
                    if isinstance(t, nn.Parameter):
                        t.data = t.data.clone()  # the Parameter object stays: optimizers and ties see it
                        copies[id(t)] = t
                        continue
                    copies[id(t)] = t.clone()
                store[name] = copies[id(t)]
    return_freed_heap()


def return_freed_heap() -> None:
    """Hand the heap freed while quantizing back to the OS: glibc keeps freed blocks below its mmap threshold in
    the process otherwise (a no-op where the C library has no ``malloc_trim``)."""
    import ctypes
    import ctypes.util

    try:
        ctypes.CDLL(ctypes.util.find_library("c")).malloc_trim(0)
    except (OSError, AttributeError, TypeError):
        pass


class QuantizeOnLoad(ConversionOps):
    """Turns one float ``weight`` into the stored tensors of its compressed layer."""

    def __init__(self, hf_quantizer: CompressedHfQuantizer):
        self.hf_quantizer = hf_quantizer

    def convert(self, input_dict, model=None, full_layer_name=None, missing_keys=None, **kwargs):
        (key, value), = input_dict.items()
        value = value[0] if isinstance(value, list) else value
        module, _ = get_module_from_name(model, key)
        prefix = key.rpartition(".")[0]
        weight = value.t() if module.source_is_conv1d else value
        try:
            tensors = self.hf_quantizer.quantized_tensors(prefix, weight, module)
        except ValueError as e:
            # transformers turns conversion errors into a generic RuntimeError; keep ours and raise it after loading.
            self.hf_quantizer.load_errors.append(f"{key}: {e}")
            tensors = self.hf_quantizer.quantized_tensors(prefix, torch.zeros_like(weight), module)
        module.drop_weight_placeholder()
        if missing_keys is not None:
            missing_keys.discard(key)
        return {f"{prefix}.{name}": t for name, t in tensors.items()}


class CompressedHfQuantizer(HfQuantizer):
    """What every hf_compress quantizer shares: swap the linears before loading, quantize each float weight
    as it loads (or reload the stored tensors, checked against the config first), dequantize.

    Subclasses set ``layer_types`` and define ``layer_for`` (an empty compressed layer for a float linear),
    ``expected_tensors`` (what a checkpoint must hold for a layer) and ``quantized_tensors`` (a float
    weight's stored tensors).
    """

    requires_calibration = False
    layer_types: tuple[type, ...] = ()

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
        return not self.pre_quantized and isinstance(module, self.layer_types) and name == "weight"

    def get_quantize_ops(self):
        return QuantizeOnLoad(self)

    def quantized_tensors(self, name: str, weight: torch.Tensor, module: nn.Module) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def layer_for(self, module: nn.Module, device=None) -> nn.Module:
        raise NotImplementedError

    def layer_for_name(self, model: nn.Module, name: str, module: nn.Module, device=None) -> nn.Module:
        """:meth:`layer_for` the linear ``name`` of ``model``, for configs whose layers differ by name (per-layer ranks)."""
        return self.layer_for(module, device=device)

    def expected_tensors(self, module: nn.Module) -> dict[str, tuple[tuple[int, ...], str | None]]:
        """``{tensor: (shape, safetensors dtype or None)}`` a checkpoint must hold for ``module``."""
        raise NotImplementedError

    def describe_config(self) -> str:
        return type(self.quantization_config).__name__

    # -- before loading: swap the layers ----------------------------------------------------------------------
    def _process_model_before_weight_loading(self, model, checkpoint_files=None, **kwargs):
        cfg = self.quantization_config
        self.modules_to_not_convert = self.get_modules_to_not_convert(
            model, cfg.modules_to_not_convert, model._keep_in_fp32_modules, add_default_skips=True
        )
        if not self.replaces_on_load:
            if not any(True for _ in iter_linears(model, self.modules_to_not_convert)):
                raise self.no_linears_error(model)
            return
        quantized_numel = 0

        def make(name, module):
            nonlocal quantized_numel
            in_f, out_f = linear_shape(module)
            quantized_numel += in_f * out_f
            layer = self.layer_for_name(model, name, module, device="meta")
            if not self.pre_quantized:
                layer.add_weight_placeholder()
            return layer

        replaced = replace_linears(model, make, self.modules_to_not_convert)
        if not replaced:
            raise self.no_linears_error(model)
        report_coverage(model, replaced, quantized_numel)
        # Some models' _init_weights re-initialise a child's `.weight` from the parent (GPT-2's c_proj). A parent
        # without parameters of its own has nothing else to initialise, so mark it done.
        for name in replaced:
            parent = model.get_submodule(name.rpartition(".")[0])
            if not any(True for _ in parent.parameters(recurse=False)):
                parent._is_hf_initialized = True
        if self.pre_quantized and checkpoint_files:
            header = checkpoint_header(checkpoint_files)
            if header:
                self.fit_to_checkpoint(model, header)
                self.check_checkpoint(model, header)

    @property
    def replaces_on_load(self) -> bool:
        """Whether the linears become QuantLinear before loading (always for a saved model; methods that
        calibrate after loading keep the float layers until then)."""
        return True

    def no_linears_error(self, model) -> ValueError:
        return ValueError(
            f"{type(model).__name__} has no linear layers to quantize (after skipping {sorted(self.modules_to_not_convert)}): "
            "hf_compress quantizes nn.Linear and Conv1D layers"
        )

    def fit_to_checkpoint(self, model, header: dict) -> None:
        """Size the empty layers from the stored shapes where the config alone does not fix them (a pruned layer's
        kept values); ``header`` is :func:`checkpoint_header`'s. Nothing to do for fixed layouts."""

    def check_checkpoint(self, model, header: dict) -> None:
        """Refuse a checkpoint whose stored tensors contradict the config before reading any weight."""
        for name, module in model.named_modules():
            if not isinstance(module, self.layer_types):
                continue
            expected = self.expected_tensors(module)
            found = {t: stored_entry(header, model, name, t) for t in expected}
            weight = found["weight"] if "weight" in found else stored_entry(header, model, name, "weight")
            if weight is not None and weight[1] in FLOAT_DTYPES and expected.get("weight", (None, None))[1] not in FLOAT_DTYPES:
                raise ValueError(
                    f"checkpoint stores {name}.weight in float but quantization_config says it is quantized: "
                    "add it to modules_to_not_convert or re-quantize the model"
                )
            missing = [t for t in expected if found[t] is None]
            if missing:
                raise ValueError(
                    f"checkpoint has no {', '.join(missing)} for the quantized layer {name} (found "
                    f"{[t for t in expected if t not in missing] or 'nothing'}): the checkpoint is incomplete or "
                    f"was written for another model; re-export it with every stored tensor ({', '.join(expected)})"
                )
            for tensor, (shape, _) in expected.items():
                if tuple(found[tensor][0]) != tuple(shape):
                    raise ValueError(
                        f"checkpoint tensor {name}.{tensor} has shape {list(found[tensor][0])} but quantization_config "
                        f"({self.describe_config()}) expects {list(shape)} for a {module.in_features}->{module.out_features} "
                        "layer: the config contradicts the stored weights; fix quantization_config in config.json or "
                        "re-quantize the model"
                    )

    def keep_uncalibrated_float(self, model, done: dict, method: str) -> None:
        """After a layer-wise calibration: linears outside the blocks (e.g. BERT's pooler) saw no calibration
        data and stay float; the saved config says so, so a reload does not expect quantized tensors for them."""
        if not done:
            raise self.no_linears_error(model)
        cfg = self.quantization_config
        left = [name for name, _ in iter_linears(model, self.modules_to_not_convert)]
        if left:
            logger.info("%s keeps %d linear layers outside the blocks in float: %s", method, len(left), left)
            cfg.modules_to_not_convert = sorted(set(cfg.modules_to_not_convert or []) | set(left))
            self.modules_to_not_convert = sorted(set(self.modules_to_not_convert) | set(left))

    # -- after loading ---------------------------------------------------------------------------------------
    def _process_model_after_weight_loading(self, model, **kwargs):
        if self.load_errors:
            errors, self.load_errors = self.load_errors, []
            raise ValueError("cannot quantize this model:\n  " + "\n  ".join(errors))
        # A quantize-on-load placeholder still on meta: the checkpoint never had that weight.
        left = [n for n, m in model.named_modules() if isinstance(m, self.layer_types)
                and "weight" in m._parameters and m._parameters["weight"].device.type == "meta"]
        if left:
            raise ValueError(f"the checkpoint has no weight for {left[:5]}{'...' if len(left) > 5 else ''}: nothing to quantize")
        if not self.pre_quantized:
            release_checkpoint_map(model)
        return model

    def _dequantize(self, model, dtype=None):
        if isinstance(dtype, str):  # save_pretrained leaves config.dtype as a string ("float32")
            dtype = getattr(torch, dtype)
        for name, module in list(model.named_modules()):
            if isinstance(module, self.layer_types):
                layer = module.to_float()
                if dtype is not None:
                    layer = layer.to(dtype)
                set_submodule(model, name, layer)
        return model


class WeightOnlyHfQuantizer(CompressedHfQuantizer):
    """Shared by every method that stores the packed weight-only GPTQ layout; subclasses define ``quantize_weight``."""

    quantization_config: WeightOnlyConfig
    layer_types = (QuantLinear,)
    scale_dtype: torch.dtype | None = None  # None: the model's dtype

    def quantize_weight(self, name: str, weight: torch.Tensor, module: QuantLinear) -> QuantizedWeight:
        raise NotImplementedError

    def quantized_tensors(self, name, weight, module):
        return self.quantize_weight(name, weight, module).pack()

    def layer_for(self, module: nn.Module, device=None) -> QuantLinear:
        """An empty QuantLinear with the shape, bias and dtype of the float ``module``."""
        cfg = self.quantization_config
        in_f, out_f = linear_shape(module)
        return QuantLinear(
            in_f,
            out_f,
            cfg.bits,
            cfg.group_size,
            bias=module.bias is not None,
            dtype=module.weight.dtype,
            device=device,
            source_is_conv1d=type(module).__name__ == "Conv1D",
            scale_dtype=self.scale_dtype,
        )

    def expected_tensors(self, module):
        cfg = self.quantization_config
        return {t: (shape, None) for t, shape in packed_shapes(module.in_features, module.out_features, cfg.bits, cfg.group_size).items()}

    def describe_config(self) -> str:
        cfg = self.quantization_config
        return f"bits={cfg.bits}, group_size={cfg.group_size}"

    def _process_model_after_weight_loading(self, model, **kwargs):
        if self.pre_quantized and self.quantization_config.checkpoint_format == "gptq":
            for module in model.modules():  # v1 checkpoints store zero - 1; in memory zeros are exact
                if isinstance(module, QuantLinear) and module.qzeros.device.type != "meta":
                    module.qzeros = shift_zero_codes(module.qzeros, module.bits, module.out_features, +1)
                    module.invalidate_kernel_cache()
        return super()._process_model_after_weight_loading(model, **kwargs)

    # -- saving ------------------------------------------------------------------------------------------------
    def get_state_dict_and_metadata(self, model):
        """The state dict with ``qzeros`` in the checkpoint's convention (v1 ``gptq``: zero - 1)."""
        cfg = self.quantization_config
        layers = {n: m for n, m in model.named_modules() if isinstance(m, QuantLinear)}
        if getattr(model, "_hf_peft_config_loaded", False) or cfg.checkpoint_format != "gptq" or not layers:
            return None, {}
        if any(bool((unpack_qzeros(m.qzeros, m.bits, m.out_features) == 0).any()) for m in layers.values()):
            logger.warning(
                "some zero codes are 0, which the gptq (v1) checkpoint format cannot store: saving with "
                "checkpoint_format='gptq_v2' (GPTQModel reads it; AutoGPTQ and vLLM may not)"
            )
            cfg.checkpoint_format = "gptq_v2"
            return None, {}
        state_dict = model.state_dict()
        for name, m in layers.items():
            key = f"{name}.qzeros"
            if key in state_dict:
                state_dict[key] = shift_zero_codes(m.qzeros, m.bits, m.out_features, -1)
        return state_dict, {}


class RTNHfQuantizer(WeightOnlyHfQuantizer):
    quantization_config: RTNConfig

    def quantize_weight(self, name, weight, module):
        cfg = self.quantization_config
        return rtn_quantize(weight, cfg.bits, cfg.group_size, cfg.sym, scale_dtype=module.scales.dtype, observer=cfg.observer)




class CalibrateAfterLoading:
    """Mixin (listed before the quantizer base) for the methods that calibrate: the float model loads as usual, then
    ``calibrate(model)`` compresses it block by block. ``calibrates`` says whether this load needs it (a saved
    model reloads packed, and some configs calibrate only with some settings)."""

    @property
    def calibrates(self) -> bool:
        return not self.pre_quantized

    @property
    def replaces_on_load(self) -> bool:
        return not self.calibrates

    def param_needs_quantization(self, model, param_name: str, **kwargs) -> bool:
        return not self.calibrates and super().param_needs_quantization(model, param_name, **kwargs)

    def _process_model_after_weight_loading(self, model, **kwargs):
        if self.calibrates:
            self.calibrate(model)
        return super()._process_model_after_weight_loading(model, **kwargs)

    def calibrate(self, model) -> dict:
        raise NotImplementedError


class GPTQHfQuantizer(CalibrateAfterLoading, WeightOnlyHfQuantizer):
    """GPTQ: the float model loads as usual, then calibrates and quantizes block by block after loading."""

    quantization_config: GPTQConfig
    scale_dtype = torch.float16  # the GPTQ checkpoint layout the serving ecosystem reads

    def calibrate(self, model) -> dict[str, float]:
        """Calibrate and quantize every convertible linear; returns each layer's relative output error."""
        from .calibration import calibration_tokens
        from .layerwise import compress_layerwise

        cfg = self.quantization_config
        windows = calibration_tokens(model, cfg)
        errors: dict[str, float] = {}

        def make_observer(linears):
            return GPTQ(linear_shape(linears[0])[0], uses=len(linears))

        def compress(name, linear, gptq):
            weight = float_weight(linear).detach()
            result = gptq.quantize(
                weight,
                cfg.bits,
                cfg.group_size,
                cfg.sym,
                desc_act=cfg.desc_act,
                static_groups=cfg.static_groups,
                damp_percent=cfg.damp_percent,
                block_size=cfg.block_size,
                scale_dtype=self.scale_dtype,
                observer=cfg.observer,
            )
            errors[name] = result.relative_error
            # The next linears and blocks must see this layer as it will run: quantized (a chunk of rows at a
            # time: dequantizing a 5632 x 2048 weight at once takes ~4 float copies of it in temporaries).
            target = linear.weight.data.t() if type(linear).__name__ == "Conv1D" else linear.weight.data
            for r in range(0, target.shape[0], ROW_CHUNK):
                target[r : r + ROW_CHUNK].copy_(result.weight.rows(r, r + ROW_CHUNK).dequantize())
            layer = self.layer_for(linear, device=weight.device)
            layer.load_quantized(result.weight, bias=linear.bias)
            return layer

        was_training = model.training
        model.eval()
        done = compress_layerwise(
            model,
            windows,
            make_observer=make_observer,
            compress=compress,
            skip=self.modules_to_not_convert,
            true_sequential=cfg.true_sequential,
            desc=f"GPTQ int{cfg.bits}",
            reuse_stable=True,  # compress changes only the linear it quantizes
        )
        model.train(was_training)
        self.keep_uncalibrated_float(model, done, "GPTQ")
        worst = max(errors, key=errors.get)
        logger.info(
            "GPTQ quantized %d linear layers; relative output error mean %.3g, worst %.3g (%s)",
            len(errors), sum(errors.values()) / len(errors), errors[worst], worst,
        )
        model.hf_compress_layer_errors = errors
        return errors
