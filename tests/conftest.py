"""Shared fixtures: tiny random models of several architectures, the local real models and data."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_EVALUATE_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
PYDOC_MODEL = SHARED / "models" / "pydoc-llama-6m"
HELDOUT = SHARED / "data" / "pydoc-heldout.txt"
CALIB = SHARED / "data" / "pydoc-calib.txt"

needs_pydoc = pytest.mark.skipif(not PYDOC_MODEL.is_dir(), reason=f"local model absent: {PYDOC_MODEL}")


def tiny_config(arch: str):
    import transformers as t

    common = dict(vocab_size=128)
    if arch == "llama":
        return t.LlamaConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                             num_key_value_heads=2, max_position_embeddings=128, **common)
    if arch == "qwen2":
        return t.Qwen2Config(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                             num_key_value_heads=2, max_position_embeddings=128, **common)
    if arch == "mistral":
        return t.MistralConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                               num_key_value_heads=2, max_position_embeddings=128, **common)
    if arch == "gpt2":
        return t.GPT2Config(n_embd=64, n_layer=2, n_head=4, n_positions=128, **common)
    if arch == "opt":
        return t.OPTConfig(hidden_size=64, ffn_dim=96, num_hidden_layers=2, num_attention_heads=4,
                           max_position_embeddings=128, word_embed_proj_dim=64, **common)
    if arch == "bert":
        return t.BertConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                            max_position_embeddings=128, **common)
    if arch == "mixtral":
        return t.MixtralConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                               num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2,
                               max_position_embeddings=128, **common)
    raise ValueError(arch)


def make_tiny(arch: str, path: Path, dtype=torch.float32) -> Path:
    """Save a seeded random tiny model of ``arch`` to ``path`` and return it."""
    import transformers as t

    torch.manual_seed(0)
    config = tiny_config(arch)
    auto = t.AutoModel if arch == "bert" else t.AutoModelForCausalLM
    model = auto.from_config(config).to(dtype)
    model.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory):
    cache = {}

    def get(arch: str, dtype=torch.float32) -> Path:
        key = (arch, dtype)
        if key not in cache:
            cache[key] = make_tiny(arch, tmp_path_factory.mktemp(f"{arch}-{str(dtype).split('.')[-1]}"), dtype)
        return cache[key]

    return get


def token_batch(vocab: int = 128, batch: int = 2, length: int = 16, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, vocab, (batch, length), generator=g)


def interpreter_worker_results(test_file: str) -> dict:
    """Run ``test_file --worker`` in a subprocess with ``TRITON_INTERPRET=1`` (set before triton is imported, so
    the rest of the session keeps compiled triton) and return the JSON it prints after ``RESULTS ``."""
    import json
    import subprocess
    import sys

    pytest.importorskip("triton")
    root = Path(__file__).resolve().parents[1]
    env = dict(os.environ, TRITON_INTERPRET="1")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(root), env.get("PYTHONPATH", "")) if p)
    proc = subprocess.run([sys.executable, str(Path(test_file).resolve()), "--worker"], env=env, capture_output=True,
                          text=True, timeout=900)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULTS ")]
    assert proc.returncode == 0 and lines, f"interpreter worker failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"
    return json.loads(lines[-1][len("RESULTS ") :])
