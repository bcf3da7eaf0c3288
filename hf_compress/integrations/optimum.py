"""optimum's quantizer interface: ``HfCompressOptimumQuantizer.from_pretrained(model).quantize(save_dir, config)``."""

from __future__ import annotations

from pathlib import Path

from optimum.quantization_base import OptimumQuantizer

from .loading import load_model
from .save import save_compressed


class HfCompressOptimumQuantizer(OptimumQuantizer):
    """Quantize a local folder or Hub id with any hf_compress config, the way optimum's quantizers do."""

    def __init__(self, model_or_path: str | Path):
        self.model_or_path = str(model_or_path)

    @classmethod
    def from_pretrained(cls, model_or_path, file_name: str | None = None):
        if file_name is not None:
            raise ValueError("hf_compress loads whole model folders: file_name is not supported")
        if not isinstance(model_or_path, (str, Path)):
            path = getattr(getattr(model_or_path, "config", None), "_name_or_path", None)
            if not path:
                raise ValueError("pass a model folder or Hub id, or a model loaded from one (its config has no _name_or_path)")
            model_or_path = path
        return cls(model_or_path)

    def quantize(self, save_dir, file_prefix: str | None = None, quantization_config=None, **kwargs):
        """Quantize with ``quantization_config`` (default ``RTNConfig(bits=8)``) and save to ``save_dir``."""
        if file_prefix is not None:
            raise ValueError("hf_compress writes standard save_pretrained folders: file_prefix is not supported")
        if quantization_config is None:
            from .config import RTNConfig

            quantization_config = RTNConfig(bits=8)
        model, tokenizer = load_model(self.model_or_path, quantization_config=quantization_config, **kwargs)
        save_compressed(model, save_dir, tokenizer=tokenizer)
        return model
