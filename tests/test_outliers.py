"""benchmarks/outliers.py: the outlier-feature reparametrisation keeps the function and makes the outliers."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch
from conftest import HELDOUT, PYDOC_MODEL, needs_pydoc, tiny_config, token_batch

_PATH = Path(__file__).resolve().parents[1] / "benchmarks" / "outliers.py"
_spec = importlib.util.spec_from_file_location("hfc_benchmarks_outliers", _PATH)
outliers = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(outliers)
add_outlier_features = outliers.add_outlier_features


def _tiny(arch: str):
    import transformers as t

    torch.manual_seed(0)
    return t.AutoModelForCausalLM.from_config(tiny_config(arch)).eval()


@needs_pydoc
def test_pydoc_perplexity_unchanged_and_outliers_present():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from hf_compress.eval import perplexity_stats

    if not HELDOUT.is_file():
        pytest.skip(f"shared data not found at {HELDOUT}")
    text = HELDOUT.read_text(encoding="utf-8")[:20000]  # tokenize a slice, not the whole file
    tok = AutoTokenizer.from_pretrained(PYDOC_MODEL)
    model = AutoModelForCausalLM.from_pretrained(PYDOC_MODEL).float().eval()
    kw = dict(seqlen=256, max_tokens=1024, progress=False)  # 4 windows
    before = perplexity_stats(model, tok, text, **kw)

    info = add_outlier_features(model)  # defaults: 4 channels, factors in [20, 60], seed 0
    assert info["layers"] == model.config.num_hidden_layers
    assert len(info["channels"]) == len(info["factors"]) == 4
    assert all(20.0 <= f <= 60.0 for f in info["factors"])

    seen = []
    handle = model.model.layers[0].self_attn.q_proj.register_forward_pre_hook(
        lambda mod, args: seen.append(args[0].detach().abs().flatten(0, -2).amax(0))
    )
    try:
        after = perplexity_stats(model, tok, text, **kw)
    finally:
        handle.remove()
    assert before["n_windows"] == after["n_windows"] == 4
    assert abs(after["perplexity"] / before["perplexity"] - 1) < 1e-4, (before, after)

    amax = torch.stack(seen).amax(0)
    mask = torch.zeros_like(amax, dtype=torch.bool)
    mask[info["channels"]] = True
    assert amax[mask].min().item() >= 20.0, amax[mask]
    assert amax[~mask].max().item() < 10.0, amax[~mask].max()


@pytest.mark.parametrize("arch", ["llama", "qwen2", "mistral"])
def test_tiny_logits_unchanged(arch):
    model = _tiny(arch)
    with torch.no_grad():  # random norm weights, so the test does not depend on them all being 1
        for m in model.modules():
            if type(m).__name__.endswith("RMSNorm"):
                m.weight.uniform_(0.5, 1.5)
    ids = token_batch(model.config.vocab_size)
    with torch.no_grad():
        ref = model(input_ids=ids).logits
        norm0 = model.model.layers[0].input_layernorm.weight.clone()
        q0 = model.model.layers[0].self_attn.q_proj.weight.clone()
        info = add_outlier_features(model, n_channels=3, seed=1)
        out = model(input_ids=ids).logits
    ch = info["channels"]
    f = torch.tensor(info["factors"], dtype=torch.float32)
    assert info["layers"] == 2
    torch.testing.assert_close(model.model.layers[0].input_layernorm.weight[ch], norm0[ch] * f)
    torch.testing.assert_close(model.model.layers[0].self_attn.q_proj.weight[:, ch], q0[:, ch] / f)
    assert not torch.equal(model.model.layers[0].input_layernorm.weight, norm0)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)


def test_gpt2_clear_error():
    model = _tiny("gpt2")
    with pytest.raises(ValueError, match=r"GPT2LMHeadModel.*input_layernorm.*self_attn\.q_proj"):
        add_outlier_features(model)


def test_bad_arguments():
    model = _tiny("llama")
    with pytest.raises(ValueError, match="n_channels"):
        add_outlier_features(model, n_channels=0)
    with pytest.raises(ValueError, match="exceeds the hidden size"):
        add_outlier_features(model, n_channels=65)
    with pytest.raises(ValueError, match="low <= high"):
        add_outlier_features(model, low=30.0, high=20.0)


def test_seed_determines_channels_and_factors():
    a = add_outlier_features(_tiny("llama"), seed=0)
    b = add_outlier_features(_tiny("llama"), seed=0)
    c = add_outlier_features(_tiny("llama"), seed=1)
    assert a == b
    assert a["channels"] != c["channels"]
    assert a["factors"] != c["factors"]
    assert a["channels"] == sorted(set(a["channels"]))
