"""hf-compress: compress Hugging Face Transformers models without leaving from_pretrained / save_pretrained.

``import hf_compress`` registers our quantization methods with transformers, so
``from_pretrained(path, quantization_config=hf_compress.RTNConfig(...))`` quantizes on load and
``from_pretrained(saved_dir)`` reloads a saved compressed model.
"""

__version__ = "0.1.0"

from .formats.gptq import export_gptq, load_gptq  # noqa: E402
from .integrations import GPTQConfig, HfCompressConfig, RTNConfig  # noqa: E402  (registers the methods)
from .nn.quant_linear import QuantLinear  # noqa: E402

__all__ = ["GPTQConfig", "HfCompressConfig", "QuantLinear", "RTNConfig", "__version__", "export_gptq", "load_gptq"]
