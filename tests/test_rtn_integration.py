"""RTN through transformers: quantize on load, forward, save, reload, dequantize, across architectures."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from conftest import token_batch
from safetensors import safe_open
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

import hf_compress
from hf_compress import QuantLinear, RTNConfig
from hf_compress.integrations.loading import is_causal_lm

ARCHS = ["llama", "qwen2", "mistral", "gpt2", "opt", "bert"]


def load(path, **kw):
    auto = AutoModelForCausalLM if is_causal_lm(AutoConfig.from_pretrained(path)) else AutoModel
    return auto.from_pretrained(path, **kw).eval()


def outputs(model, ids):
    with torch.inference_mode():
        out = model(ids)
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


@pytest.mark.parametrize("arch", ARCHS)
def test_quantize_save_reload_every_architecture(arch, tiny_models, tmp_path):
    path = tiny_models(arch)
    ids = token_batch()
    ref = outputs(load(path), ids)
    model = load(path, quantization_config=RTNConfig(bits=8))
    n_quant = sum(isinstance(m, QuantLinear) for m in model.modules())
    assert n_quant >= 4 * 2  # at least q/k/v/o-ish per block
    got = outputs(model, ids)
    rel = (got - ref).norm() / ref.norm()
    assert rel < 0.02, f"int8 relative error {rel:.4f}"

    model.save_pretrained(tmp_path / "q")
    saved = json.loads((tmp_path / "q" / "config.json").read_text())["quantization_config"]
    assert saved["quant_method"] == "hf_compress_rtn" and saved["bits"] == 8 and saved["group_size"] == -1
    with safe_open(str(tmp_path / "q" / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
    qkeys = [k for k in keys if k.endswith(".qweight")]
    assert len(qkeys) == n_quant
    for k in qkeys:
        assert k.removesuffix("qweight") + "weight" not in keys  # packed layers carry no float weight

    reloaded = load(tmp_path / "q")
    assert isinstance(reloaded.hf_quantizer, hf_compress.integrations.RTNHfQuantizer)
    assert torch.equal(outputs(reloaded, ids), got)  # bit-identical logits after save -> reload


def test_output_embeddings_and_tied_weights_stay_float(tiny_models):
    model = load(tiny_models("gpt2"), quantization_config=RTNConfig(bits=4))
    assert not isinstance(model.lm_head, QuantLinear)
    model = load(tiny_models("llama"), quantization_config=RTNConfig(bits=4, modules_to_not_convert=["mlp.down_proj"]))
    assert not isinstance(model.lm_head, QuantLinear)
    assert not isinstance(model.model.layers[0].mlp.down_proj, QuantLinear)
    assert isinstance(model.model.layers[0].mlp.up_proj, QuantLinear)


@pytest.mark.parametrize("bits,group_size,sym", [(4, 32, True), (4, 48, False), (3, 32, False), (2, 16, False), (8, -1, False)])
def test_layer_matches_reference_dequantize(bits, group_size, sym, tiny_models):
    # 48 does not divide 64 inputs (or 96): the last group is shorter.
    model = load(tiny_models("llama"), quantization_config=RTNConfig(bits=bits, group_size=group_size, sym=sym))
    layer = model.model.layers[0].mlp.down_proj
    x = torch.randn(3, layer.in_features)
    expected = x @ layer.dequantize_weight().t()
    torch.testing.assert_close(layer(x), expected, rtol=2e-2, atol=2e-2 * expected.abs().max().item())
    torch.testing.assert_close(layer.forward_reference(x), expected, rtol=1e-5, atol=1e-5)


def test_mse_observer_on_load_and_in_the_saved_config(tiny_models, tmp_path):
    from hf_compress.methods.rtn import rtn_quantize

    path = tiny_models("llama")
    ref = AutoModelForCausalLM.from_pretrained(path).model.layers[0].mlp.up_proj.weight
    model = load(path, quantization_config=RTNConfig(bits=3, group_size=32, observer="mse"))
    layer = model.model.layers[0].mlp.up_proj
    expected = rtn_quantize(ref.detach(), 3, 32, scale_dtype=layer.scales.dtype, observer="mse").dequantize()
    assert torch.equal(layer.dequantize_weight(), expected)
    minmax = rtn_quantize(ref.detach(), 3, 32, scale_dtype=layer.scales.dtype).dequantize()
    assert not torch.equal(expected, minmax)
    model.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["quantization_config"]["observer"] == "mse"


def _mapped_tensors(model) -> list[str]:
    """Names of CPU tensors whose storage is the checkpoint's memory map (safetensors' zero-copy load)."""
    tensors = list(model.named_parameters(remove_duplicate=False)) + list(model.named_buffers(remove_duplicate=False))
    return [n for n, t in tensors if t.device.type == "cpu" and not t.untyped_storage().resizable()]


def test_quantize_on_load_releases_the_checkpoint_map(tiny_models):
    """While any float tensor still lives in the checkpoint's map, the pages of every weight read while quantizing
    stay resident: the loader copies what it keeps, ties included."""
    path = tiny_models("gpt2")
    assert _mapped_tensors(load(path))  # a plain float load is zero-copy: the check below can fail
    model = load(path, quantization_config=RTNConfig(bits=4, group_size=32))
    assert _mapped_tensors(model) == []
    assert model.lm_head.weight is model.transformer.wte.weight  # still tied
    float_model = load(path)
    assert torch.equal(model.transformer.wte.weight, float_model.transformer.wte.weight)


def test_generate_runs_on_packed_weights(tiny_models):
    model = load(tiny_models("llama"), quantization_config=RTNConfig(bits=4, group_size=32))
    out = model.generate(token_batch(batch=1, length=5), max_new_tokens=6, do_sample=False)
    assert out.shape == (1, 11)


def test_dequantize_returns_float_model(tiny_models, tmp_path):
    ids = token_batch()
    for arch in ("llama", "gpt2"):
        model = load(tiny_models(arch), quantization_config=RTNConfig(bits=4, group_size=32))
        with hf_compress.kernels.use_backend("reference"):
            q_out = outputs(model, ids)
        model.dequantize()
        assert not any(isinstance(m, QuantLinear) for m in model.modules())
        assert getattr(model.config, "quantization_config", None) is None
        torch.testing.assert_close(outputs(model, ids), q_out, rtol=1e-4, atol=1e-4)
        model.save_pretrained(tmp_path / arch)
        plain = load(tmp_path / arch)
        torch.testing.assert_close(outputs(plain, ids), q_out, rtol=1e-4, atol=1e-4)


def test_bf16_checkpoint(tiny_models, tmp_path):
    path = tiny_models("llama", torch.bfloat16)
    model = load(path, quantization_config=RTNConfig(bits=4, group_size=32))
    layer = model.model.layers[0].self_attn.q_proj
    assert layer.scales.dtype == torch.bfloat16
    ids = token_batch()
    got = outputs(model, ids)
    assert got.dtype == torch.bfloat16 and torch.isfinite(got).all()
    model.save_pretrained(tmp_path / "q")
    assert torch.equal(outputs(load(tmp_path / "q"), ids), got)


def test_load_without_plugin_reports_weights_missing(tiny_models, tmp_path):
    load(tiny_models("llama"), quantization_config=RTNConfig(bits=4)).save_pretrained(tmp_path / "q")
    code = (
        "import sys, transformers; from transformers import AutoModelForCausalLM;"
        "transformers.logging.set_verbosity_warning();"
        f"m, info = AutoModelForCausalLM.from_pretrained({str(tmp_path / 'q')!r}, output_loading_info=True);"
        "print(sorted(info['missing_keys']))"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    assert "model.layers.0.self_attn.q_proj.weight" in res.stdout
    assert "model.layers.1.mlp.down_proj.weight" in res.stdout


def test_push_to_hub_uploads_what_save_pretrained_writes(tiny_models, tmp_path, monkeypatch):
    import transformers.utils.hub as hub

    model = load(tiny_models("llama"), quantization_config=RTNConfig(bits=4, group_size=32))
    uploaded = {}

    class FakeApi:
        def create_repo(self, repo_id, **kw):
            return type("Repo", (), {"repo_id": repo_id})()

        def create_commit(self, repo_id, operations, **kw):
            for op in operations:
                with open(op.path_or_fileobj, "rb") as f:
                    uploaded[op.path_in_repo] = f.read()

    class FakeCard:
        def save(self, path):
            open(path, "w").write("card")

    monkeypatch.setattr(hub, "hf_api", lambda: FakeApi())
    monkeypatch.setattr(hub, "create_and_tag_model_card", lambda *a, **k: FakeCard())
    model.push_to_hub("me/tiny-rtn")
    model.save_pretrained(tmp_path / "saved")
    saved = {p.name: p.read_bytes() for p in (tmp_path / "saved").iterdir()}
    assert set(uploaded) - {"README.md"} == set(saved)
    for name, data in saved.items():
        if name.endswith(".safetensors"):
            assert uploaded[name] == data


def test_device_map_auto_and_disk_offload(tiny_models, tmp_path):
    path = tiny_models("llama")
    ids = token_batch()
    ref = outputs(load(path, quantization_config=RTNConfig(bits=8)), ids)
    auto = load(path, quantization_config=RTNConfig(bits=8), device_map="auto")
    torch.testing.assert_close(outputs(auto, ids), ref)
    device_map = {"model.embed_tokens": "cpu", "model.layers.0": "cpu", "model.layers.1": "disk",
                  "model.norm": "cpu", "model.rotary_emb": "cpu", "lm_head": "cpu"}
    off = load(path, quantization_config=RTNConfig(bits=8), device_map=device_map, offload_folder=str(tmp_path / "off"))
    torch.testing.assert_close(outputs(off, ids), ref)


def test_mixtral_experts_skipped_with_coverage_warning(tiny_models, caplog):
    from transformers.utils import logging as hf_logging

    hf_logging.enable_propagation()
    try:
        with caplog.at_level("WARNING"):
            model = load(tiny_models("mixtral"), quantization_config=RTNConfig(bits=8))
    finally:
        hf_logging.disable_propagation()
    assert any(isinstance(m, QuantLinear) for m in model.modules())
    msg = " ".join(r.getMessage() for r in caplog.records)
    assert "mixture-of-experts" in msg and "% of the linear and expert weights are quantized" in msg
    assert torch.isfinite(outputs(model, token_batch())).all()


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_symmetric_grid_is_gptqs(bits):
    # zero code 2**(bits-1), step 2*absmax/(2**bits - 1): every code is used, as AutoGPTQ/GPTQModel do
    from hf_compress.methods.rtn import group_qparams

    w = torch.tensor([[-3.0, 1.0, 2.0, 0.5], [0.25, -0.5, 0.1, 0.0]])
    scales, zeros = group_qparams(w, bits, -1, True, torch.float32)
    assert torch.equal(zeros, torch.full((2, 1), 1 << (bits - 1), dtype=torch.int32))
    assert torch.allclose(scales[:, 0], torch.tensor([3.0, 0.5]) * 2 / ((1 << bits) - 1))
