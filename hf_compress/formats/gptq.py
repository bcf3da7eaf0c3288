"""The GPTQ checkpoint format of the serving ecosystem (AutoGPTQ, GPTQModel, vLLM), both ways.

- :func:`load_gptq` loads an existing GPTQ checkpoint (``quant_method: gptq``, v1 or v2 zero convention)
  onto our layers, so Hub GPTQ models run through our CPU and Triton kernels without gptqmodel.
- :func:`export_gptq` rewrites one of our RTN/GPTQ folders as a ``quant_method: gptq`` checkpoint: v1
  zeros, fp16 scales, and the config keys GPTQModel and vLLM read.

Both read and write safetensors and JSON only.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from transformers.utils import logging

from ..integrations.config import GPTQConfig
from ..integrations.loading import check_model_path, is_causal_lm
from ..integrations.save import atomic_dir
from ..quant.layout import shift_zero_codes, unpack_qzeros

logger = logging.get_logger(__name__)

OUR_METHODS = ("hf_compress_gptq", "hf_compress_rtn")


def _local_folder(path_or_id: str) -> Path:
    check_model_path(path_or_id)
    p = Path(str(path_or_id)).expanduser()
    if p.is_dir():
        return p
    from huggingface_hub import snapshot_download  # a Hub id: only what we read (never pickles)

    return Path(snapshot_download(str(path_or_id), allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt"]))


def _safetensors_files(folder: Path) -> list[Path]:
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(
            f"{folder} has no .safetensors weights: hf_compress reads safetensors only (never pickled .bin files); "
            "convert the checkpoint to safetensors first"
        )
    return files


def _tensor_names(files: list[Path]) -> set[str]:
    names: set[str] = set()
    for f in files:
        with safe_open(str(f), "pt") as fh:
            names.update(fh.keys())
    return names


def gptq_config_from_checkpoint(qc: dict, tensor_names: set[str]) -> GPTQConfig:
    """Our :class:`GPTQConfig` for a checkpoint's ``quant_method: gptq`` config dict."""
    if qc.get("quant_method") != "gptq":
        raise ValueError(
            f"not a GPTQ checkpoint: its quantization_config has quant_method {qc.get('quant_method')!r}, "
            "load_gptq reads quant_method 'gptq' (use from_pretrained for hf_compress folders)"
        )
    fmt = qc.get("checkpoint_format") or "gptq"
    if fmt not in ("gptq", "gptq_v2"):
        raise ValueError(f"unsupported GPTQ checkpoint_format {fmt!r}: load_gptq reads 'gptq' (v1) and 'gptq_v2'")
    if qc.get("dynamic"):
        raise ValueError("per-module 'dynamic' GPTQ settings are not supported by load_gptq")
    # Linears stored in float stay float (e.g. lm_head, or modules the writer skipped).
    quantized = {n[: -len(".qweight")] for n in tensor_names if n.endswith(".qweight")}
    if not quantized:
        raise ValueError("the checkpoint says GPTQ but holds no '.qweight' tensors")
    floats = sorted(n[: -len(".weight")] for n in tensor_names if n.endswith(".weight") and n[: -len(".weight")] not in quantized)
    return GPTQConfig(
        bits=qc.get("bits", 4),
        group_size=qc.get("group_size", -1),
        sym=qc.get("sym", True),
        desc_act=bool(qc.get("desc_act", False)),
        static_groups=bool(qc.get("static_groups", False)),
        damp_percent=qc.get("damp_percent", 0.01),
        true_sequential=bool(qc.get("true_sequential", True)),
        checkpoint_format=fmt,
        modules_to_not_convert=floats or None,
    )


def load_gptq(path_or_id: str, model_class=None, **from_pretrained_kwargs):
    """Load a GPTQ checkpoint (``quant_method: gptq``) onto hf_compress layers.

    ``model_class`` defaults to ``AutoModelForCausalLM`` for causal LMs, else ``AutoModel``; other keyword
    arguments go to ``from_pretrained`` (``device_map``, ``dtype``...). The loaded model saves as an
    hf_compress folder; :func:`export_gptq` writes it back in this format.
    """
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

    folder = _local_folder(path_or_id)
    config = AutoConfig.from_pretrained(folder)
    qc = getattr(config, "quantization_config", None)
    if qc is None:
        raise ValueError(f"{path_or_id} has no quantization_config: it is not a GPTQ checkpoint (quant_method 'gptq')")
    qc = qc if isinstance(qc, dict) else qc.to_dict()
    names = _tensor_names(_safetensors_files(folder))
    ours = gptq_config_from_checkpoint(qc, names)
    config.quantization_config = ours.to_dict()
    model_class = model_class or (AutoModelForCausalLM if is_causal_lm(config) else AutoModel)
    from_pretrained_kwargs.pop("quantization_config", None)
    return model_class.from_pretrained(folder, config=config, **from_pretrained_kwargs)


def _gptq_config_dict(qc: dict, quantized: set[str], float_linears: list[str]) -> dict:
    out = {
        "quant_method": "gptq",
        "bits": qc["bits"],
        "group_size": qc["group_size"],
        "desc_act": bool(qc.get("desc_act", False)),
        "static_groups": bool(qc.get("static_groups", False)),
        "sym": qc["sym"],
        "true_sequential": bool(qc.get("true_sequential", True)),
        "damp_percent": qc.get("damp_percent", 0.01),
        "checkpoint_format": "gptq",
        "lm_head": any(n.endswith("lm_head") for n in quantized),
        "meta": {"quantizer": [f"hf_compress:{qc['quant_method']}"]},
    }
    if float_linears:  # GPTQModel's negative 'dynamic' match: these modules are not quantized
        out["dynamic"] = {f"-:^{re.escape(n)}$": {} for n in float_linears}
    return out


def export_gptq(src, dst) -> Path:
    """Rewrite an hf_compress RTN/GPTQ folder ``src`` as a GPTQ checkpoint in ``dst`` (written atomically)."""
    src = Path(src)
    if not (src / "config.json").is_file():
        raise FileNotFoundError(f"{src} has no config.json: pass a folder written by hf-compress quantize / save_pretrained")
    config = json.loads((src / "config.json").read_text())
    qc = config.get("quantization_config") or {}
    if qc.get("quant_method") not in OUR_METHODS:
        raise ValueError(
            f"{src} is not an hf_compress RTN/GPTQ folder (quant_method {qc.get('quant_method')!r}); "
            f"export --format gptq reads {list(OUR_METHODS)}"
        )
    bits = qc["bits"]
    # Older folders (format_version 1) stored exact zero codes.
    stored_v1 = qc.get("checkpoint_format", "gptq" if qc.get("format_version", 1) >= 2 else "gptq_v2") == "gptq"
    files = _safetensors_files(src)
    with atomic_dir(dst) as tmp:
        quantized: set[str] = set()
        linears: set[str] = set()
        for f in files:
            tensors, metadata = {}, None
            with safe_open(str(f), "pt") as fh:
                metadata = fh.metadata()
                for key in fh.keys():
                    tensors[key] = fh.get_tensor(key)
            for key in list(tensors):
                if key.endswith(".qweight"):
                    quantized.add(key[: -len(".qweight")])
                if key.endswith(".scales"):
                    tensors[key] = tensors[key].to(torch.float16)
                if key.endswith(".qzeros") and not stored_v1:
                    out_features = tensors[key[: -len(".qzeros")] + ".scales"].shape[1]
                    if bool((unpack_qzeros(tensors[key], bits, out_features) == 0).any()):
                        raise ValueError(f"{key} holds a zero code of 0, which the gptq (v1) format cannot store")
                    tensors[key] = shift_zero_codes(tensors[key], bits, out_features, -1)
                if key.endswith(".weight") and tensors[key].dim() == 2:
                    linears.add(key[: -len(".weight")])
            save_file(tensors, str(tmp / f.name), metadata=metadata or {"format": "pt"})
        for p in src.iterdir():  # tokenizer, generation config, index, model card...
            if p.is_file() and p.suffix != ".safetensors" and p.name != "config.json":
                shutil.copy2(p, tmp / p.name)
        skipped = [s for s in (qc.get("modules_to_not_convert") or []) if s in linears]
        config["quantization_config"] = _gptq_config_dict(qc, quantized, skipped)
        (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    logger.info("exported %s as a GPTQ checkpoint to %s (%d quantized linears)", src, dst, len(quantized))
    return Path(dst)
