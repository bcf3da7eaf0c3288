"""transformers glue: our configs and quantizers, registered under ``hf_compress_<method>`` names."""

from transformers.quantizers.auto import (
    AUTO_QUANTIZATION_CONFIG_MAPPING,
    AUTO_QUANTIZER_MAPPING,
    register_quantization_config,
    register_quantizer,
)

from .config import HfCompressConfig, RTNConfig
from .quantizer import RTNHfQuantizer

METHODS = {RTNConfig.quant_method: (RTNConfig, RTNHfQuantizer)}


def register_all() -> None:
    """Register every method once (importing hf_compress twice, e.g. after a reload, must not fail)."""
    for name, (config_cls, quantizer_cls) in METHODS.items():
        if AUTO_QUANTIZATION_CONFIG_MAPPING.get(name) is not config_cls:
            AUTO_QUANTIZATION_CONFIG_MAPPING.pop(name, None)
            register_quantization_config(name)(config_cls)
        if AUTO_QUANTIZER_MAPPING.get(name) is not quantizer_cls:
            AUTO_QUANTIZER_MAPPING.pop(name, None)
            register_quantizer(name)(quantizer_cls)


register_all()

__all__ = ["HfCompressConfig", "METHODS", "RTNConfig", "RTNHfQuantizer", "register_all"]
