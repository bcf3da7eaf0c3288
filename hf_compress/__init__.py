"""hf-compress: compress Hugging Face Transformers models without leaving from_pretrained / save_pretrained.

``import hf_compress`` registers our quantization methods with transformers, so
``from_pretrained(path, quantization_config=hf_compress.RTNConfig(...))`` quantizes on load and
``from_pretrained(saved_dir)`` reloads a saved compressed model.
"""

__version__ = "0.1.0"

from .formats.bitnet import export_bitnet, import_bitnet  # noqa: E402
from .formats.bitsandbytes import export_bitsandbytes, load_bitsandbytes_int8  # noqa: E402
from .formats.gguf import compute_imatrix, export_gguf, load_gguf  # noqa: E402
from .formats.gptq import export_gptq, load_gptq  # noqa: E402
from .integrations import (  # noqa: E402  (registers the methods)
    BitLinearConfig,
    BitLinearWarmup,
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
    convert_qat,
    prepare_qat,
    set_quantization_strength,
)
from .integrations import pack_model as pack_bitlinear  # noqa: E402
from .integrations.structured import StructuredPruneConfig, prune_structured  # noqa: E402
from .nn.bitlinear import BitLinear, OneBitLinear, PackedBitLinear  # noqa: E402
from .nn.int8_linear import Int8MixedLinear, W8A8Linear  # noqa: E402
from .nn.lowrank_linear import LowRankLinear  # noqa: E402
from .nn.qat_linear import FakeQuantLinear  # noqa: E402
from .nn.quant_linear import QuantLinear  # noqa: E402
from .nn.sparse_linear import SparseLinear  # noqa: E402

__all__ = [
    "BitLinear",
    "BitLinearConfig",
    "BitLinearWarmup",
    "OneBitConfig",
    "OneBitLinear",
    "PackedBitLinear",
    "FakeQuantLinear",
    "QATConfig",
    "prepare_qat",
    "convert_qat",
    "pack_bitlinear",
    "set_quantization_strength",
    "DistillationArguments",
    "DistillationTrainer",
    "GPTQConfig",
    "HfCompressConfig",
    "Int8MixedConfig",
    "Int8MixedLinear",
    "LowRankConfig",
    "LowRankLinear",
    "MagnitudePruneConfig",
    "QuantLinear",
    "RTNConfig",
    "SparseGPTConfig",
    "SparseLinear",
    "StructuredPruneConfig",
    "WandaConfig",
    "W8A8Config",
    "W8A8Linear",
    "__version__",
    "export_bitnet",
    "export_bitsandbytes",
    "export_gguf",
    "export_gptq",
    "compute_imatrix",
    "generate_distillation_dataset",
    "import_bitnet",
    "load_bitsandbytes_int8",
    "load_adapter",
    "load_gguf",
    "load_gptq",
    "lora_config",
    "merge_report",
    "precompute_teacher_logits",
    "prune_structured",
    "student_from_teacher",
]

# The distillation API imports transformers' Trainer (and with it peft and accelerate, ~3 s): loaded on first use.
_DISTILL = ("DistillationArguments", "DistillationTrainer", "generate_distillation_dataset", "precompute_teacher_logits", "student_from_teacher")


_PEFT = ("load_adapter", "lora_config", "merge_report")


def __getattr__(name):
    if name in _DISTILL:
        from . import distill

        return getattr(distill, name)
    if name in _PEFT:
        from .integrations import peft

        return getattr(peft, name)
    raise AttributeError(f"module 'hf_compress' has no attribute {name!r}")

