"""Loading a model by local path or Hub id, causal LM or encoder, with a clear error for a missing path."""

from __future__ import annotations

import re
from pathlib import Path

from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoTokenizer

HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


def check_model_path(path_or_id: str) -> None:
    """A missing local folder is an error here; anything shaped like a Hub id is left to transformers."""
    p = Path(str(path_or_id)).expanduser()
    if p.exists():
        if p.is_dir() and not (p / "config.json").is_file():
            raise FileNotFoundError(f"{p} has no config.json: pass a folder written by save_pretrained (or a Hub id)")
        return
    if not HUB_ID.match(str(path_or_id)) or str(path_or_id).startswith("."):
        raise FileNotFoundError(f"model not found: {path_or_id} (pass an existing local folder or a Hub id such as org/name)")


def is_causal_lm(config) -> bool:
    archs = getattr(config, "architectures", None) or []
    return any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in archs)


def load_model(path_or_id: str, quantization_config=None, **kwargs):
    """``(model, tokenizer)``: a causal LM when the config says so, else the bare encoder (``AutoModel``)."""
    check_model_path(path_or_id)
    config = AutoConfig.from_pretrained(path_or_id)
    auto = AutoModelForCausalLM if is_causal_lm(config) else AutoModel
    if quantization_config is not None:
        kwargs["quantization_config"] = quantization_config
    model = auto.from_pretrained(path_or_id, **kwargs)
    return model.eval(), load_tokenizer(path_or_id)


def load_tokenizer(path_or_id: str):
    """The model's tokenizer, or None for a local folder that has none (e.g. a bare test model)."""
    p = Path(str(path_or_id))
    if p.is_dir() and not any((p / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json", "vocab.txt")):
        return None
    return AutoTokenizer.from_pretrained(path_or_id)

