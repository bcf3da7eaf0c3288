"""transformers glue: our configs and quantizers, registered under ``hf_compress_<method>`` names."""

from transformers.quantizers.auto import (
    AUTO_QUANTIZATION_CONFIG_MAPPING,
    AUTO_QUANTIZER_MAPPING,
    AutoHfQuantizer,
    register_quantization_config,
    register_quantizer,
)

from .bitnet import BitLinearHfQuantizer, BitLinearWarmup, OneBitHfQuantizer, pack_model, set_quantization_strength
from .config import (
    BitLinearConfig,
    GPTQConfig,
    HfCompressConfig,
    Int8MixedConfig,
    LowRankConfig,
    MagnitudePruneConfig,
    OneBitConfig,
    QATConfig,
    RTNConfig,
    SparseGPTConfig,
    W8A8Config,
    WandaConfig,
)
from .int8 import Int8MixedHfQuantizer, W8A8HfQuantizer
from .lowrank import LowRankHfQuantizer
from .prune import MagnitudePruneHfQuantizer, SparseGPTHfQuantizer, WandaHfQuantizer
from .qat import QATHfQuantizer, attach_quantizer, convert_qat, prepare_qat
from .quantizer import GPTQHfQuantizer, RTNHfQuantizer

METHODS = {
    RTNConfig.quant_method: (RTNConfig, RTNHfQuantizer),
    GPTQConfig.quant_method: (GPTQConfig, GPTQHfQuantizer),
    Int8MixedConfig.quant_method: (Int8MixedConfig, Int8MixedHfQuantizer),
    W8A8Config.quant_method: (W8A8Config, W8A8HfQuantizer),
    BitLinearConfig.quant_method: (BitLinearConfig, BitLinearHfQuantizer),
    OneBitConfig.quant_method: (OneBitConfig, OneBitHfQuantizer),
    QATConfig.quant_method: (QATConfig, QATHfQuantizer),
    MagnitudePruneConfig.quant_method: (MagnitudePruneConfig, MagnitudePruneHfQuantizer),
    WandaConfig.quant_method: (WandaConfig, WandaHfQuantizer),
    SparseGPTConfig.quant_method: (SparseGPTConfig, SparseGPTHfQuantizer),
    LowRankConfig.quant_method: (LowRankConfig, LowRankHfQuantizer),
}
LOADERS = {"gptq": "hf_compress.load_gptq(path)", "bitsandbytes": "hf_compress.load_bitsandbytes_int8(path)"}


def _refuse_requantizing(merge):
    """transformers silently keeps a checkpoint's own quantization when another config is passed; for ours,
    say what happened and what to do instead."""

    def merge_quantization_configs(cls, quantization_config, quantization_config_from_args):
        if isinstance(quantization_config_from_args, HfCompressConfig):
            found = quantization_config.get("quant_method") if isinstance(quantization_config, dict) else getattr(quantization_config, "quant_method", None)
            found = getattr(found, "value", found)
            if found != quantization_config_from_args.quant_method:
                hint = f"load it with {LOADERS[found]}" if found in LOADERS else "load it without quantization_config"
                raise ValueError(
                    f"this checkpoint is already quantized (quant_method {found!r}); {type(quantization_config_from_args).__name__} "
                    f"quantizes float checkpoints: {hint}, or start from the float model"
                )
        return merge.__func__(cls, quantization_config, quantization_config_from_args)

    merge_quantization_configs._hf_compress = True
    return classmethod(merge_quantization_configs)


def register_all() -> None:
    """Register every method once (importing hf_compress twice, e.g. after a reload, must not fail)."""
    for name, (config_cls, quantizer_cls) in METHODS.items():
        if AUTO_QUANTIZATION_CONFIG_MAPPING.get(name) is not config_cls:
            AUTO_QUANTIZATION_CONFIG_MAPPING.pop(name, None)
            register_quantization_config(name)(config_cls)
        if AUTO_QUANTIZER_MAPPING.get(name) is not quantizer_cls:
            AUTO_QUANTIZER_MAPPING.pop(name, None)
            register_quantizer(name)(quantizer_cls)
    if not getattr(AutoHfQuantizer.merge_quantization_configs, "_hf_compress", False):
        AutoHfQuantizer.merge_quantization_configs = _refuse_requantizing(AutoHfQuantizer.merge_quantization_configs)


def install_peft_hook() -> None:
    """Teach PEFT our layers (:func:`hf_compress.integrations.peft.install`). peft is a dependency, and
    ``transformers.trainer_utils`` (which our BitNet callback needs) imports it anyway."""
    import importlib.util

    if importlib.util.find_spec("peft") is not None:
        from .peft import install

        install()


register_all()
install_peft_hook()

__all__ = [
    "BitLinearConfig",
    "BitLinearHfQuantizer",
    "BitLinearWarmup",
    "OneBitConfig",
    "OneBitHfQuantizer",
    "QATConfig",
    "QATHfQuantizer",
    "attach_quantizer",
    "convert_qat",
    "prepare_qat",
    "pack_model",
    "set_quantization_strength",
    "GPTQConfig",
    "GPTQHfQuantizer",
    "HfCompressConfig",
    "Int8MixedConfig",
    "Int8MixedHfQuantizer",
    "LowRankConfig",
    "MagnitudePruneConfig",
    "METHODS",
    "RTNConfig",
    "RTNHfQuantizer",
    "SparseGPTConfig",
    "W8A8Config",
    "WandaConfig",
    "W8A8HfQuantizer",
    "register_all",
]
