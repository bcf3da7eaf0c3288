"""LoRA on every hf_compress format: wrapping, gradients through the packed backward, Trainer, adapters saved and
reloaded with plain PEFT calls, merge -> requantize -> reload with the reported error, and bad input."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
import torch
import transformers as t
from conftest import token_batch
from peft import LoraConfig, PeftModel, get_peft_model

import hf_compress
from hf_compress import kernels
from hf_compress.integrations.peft import PACKED_LAYERS, QuantizedLoraLinear

FORMATS = {
    "rtn-int4": lambda: hf_compress.RTNConfig(bits=4, group_size=32),
    "rtn-int2-asym": lambda: hf_compress.RTNConfig(bits=2, group_size=32, sym=False),
    "llm-int8": lambda: hf_compress.Int8MixedConfig(),
    "w8a8-static-smooth": lambda: hf_compress.W8A8Config(mode="static", smooth_alpha=0.5, n_samples=4, seqlen=16,
                                                         dataset=token_batch(batch=4, length=16, seed=5)),
    "bitnet-b1.58": lambda: hf_compress.BitLinearConfig(),
    "onebit": lambda: hf_compress.OneBitConfig(),
}


@pytest.fixture(scope="module")
def tiny(tiny_models):
    return tiny_models("llama")


def quantized(tiny, fmt):
    return t.AutoModelForCausalLM.from_pretrained(tiny, quantization_config=FORMATS[fmt]())


def with_lora(model, seed=0, **kw):
    torch.manual_seed(seed)
    kw.setdefault("target_modules", "all-linear")
    return get_peft_model(model, LoraConfig(r=4, lora_alpha=8, **kw))


def randomize_b(peft_model, std=0.05, seed=1):
    """LoRA starts with B = 0; give B values so the adapter changes the output (as after training)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * std)


def logits(model, ids):
    with torch.no_grad(), kernels.use_backend("reference"):
        return model(ids).logits


@pytest.mark.parametrize("fmt", list(FORMATS))
def test_all_linear_wraps_every_packed_layer_and_starts_as_the_base(tiny, fmt):
    base = quantized(tiny, fmt)
    n_packed = sum(isinstance(m, PACKED_LAYERS) for m in base.modules())
    ids = token_batch()
    before = logits(base, ids)
    model = with_lora(base)
    wrapped = [m for m in model.modules() if isinstance(m, QuantizedLoraLinear)]
    assert len(wrapped) == n_packed == 14
    assert torch.equal(logits(model, ids), before)  # B = 0


@pytest.mark.parametrize("fmt", ["rtn-int4", "llm-int8", "bitnet-b1.58"])
def test_input_gradient_is_the_dequantized_weights(tiny, fmt):
    layer = quantized(tiny, fmt).model.layers[0].self_attn.q_proj
    x = torch.randn(3, 64, requires_grad=True)
    layer(x).pow(2).sum().backward()
    w = layer.dequantize_weight().float()
    with torch.no_grad():
        y = layer(x)
    torch.testing.assert_close(x.grad, (2 * y) @ w, rtol=1e-4, atol=1e-4)


def test_trainer_trains_only_the_adapter(tiny, tmp_path):
    from datasets import Dataset

    model = with_lora(quantized(tiny, "rtn-int4"))
    q = model.base_model.model.model.layers[0].self_attn.q_proj
    packed = q.base_layer.qweight.clone()
    a0 = q.lora_A["default"].weight.detach().clone()
    ids = token_batch(batch=8, length=16, seed=3).tolist()
    data = Dataset.from_dict({"input_ids": ids, "labels": ids})
    args = t.TrainingArguments(output_dir=str(tmp_path), max_steps=8, per_device_train_batch_size=8, learning_rate=1e-2,
                               report_to=[], save_strategy="no", use_cpu=True, disable_tqdm=True, logging_steps=1)
    trainer = t.Trainer(model=model, args=args, train_dataset=data)
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert losses[-1] < losses[0]
    assert not torch.equal(q.lora_A["default"].weight, a0)
    assert torch.equal(q.base_layer.qweight, packed)  # the base stays packed and frozen
    assert not any(p.requires_grad for n, p in model.named_parameters() if "lora_" not in n)


@pytest.mark.parametrize("fmt", list(FORMATS))
def test_adapter_save_and_plain_peft_reload(tiny, tmp_path, fmt):
    model = with_lora(quantized(tiny, fmt))
    randomize_b(model)
    ids = token_batch()
    expected = logits(model, ids)
    model.save_pretrained(tmp_path / "adapter")
    assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file()
    again = PeftModel.from_pretrained(quantized(tiny, fmt), tmp_path / "adapter")
    assert torch.equal(logits(again, ids), expected)


@pytest.mark.parametrize("fmt", ["rtn-int4", "rtn-int2-asym", "llm-int8", "w8a8-static-smooth", "bitnet-b1.58"])
def test_merge_requantizes_onto_the_grid_and_reloads(tiny, tmp_path, fmt):
    model = with_lora(quantized(tiny, fmt))
    randomize_b(model, std=0.5)  # big enough that part of it survives rounding
    ids = token_batch()
    lora_logits = logits(model, ids)
    q = model.base_model.model.model.layers[0].self_attn.q_proj
    target = q.base_layer.dequantize_weight().float() + q.get_delta_weight("default").float()
    merged = model.merge_and_unload()
    layer = merged.model.layers[0].self_attn.q_proj
    assert isinstance(layer, PACKED_LAYERS)
    after = layer.dequantize_weight().float()
    err = (after - target).norm().item()
    report = hf_compress.merge_report(merged)
    assert len(report) == 14
    assert report["model.layers.0.self_attn.q_proj"]["relative_weight_error"] == pytest.approx(err / target.norm().item(), rel=1e-5)
    kept = report["model.layers.0.self_attn.q_proj"]["update_kept"]
    assert 0.0 < kept <= 1.0
    merged_logits = logits(merged, ids)
    assert (merged_logits - lora_logits).norm() < (logits(quantized(tiny, fmt), ids) - lora_logits).norm()
    merged.save_pretrained(tmp_path / "merged")
    again = t.AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    assert torch.equal(logits(again, ids), merged_logits)


def test_merge_moves_each_weight_by_at_most_the_update(tiny):
    model = with_lora(quantized(tiny, "rtn-int4"))
    randomize_b(model, std=0.2)
    q = model.base_model.model.model.layers[1].mlp.down_proj
    before = q.base_layer.dequantize_weight().float()
    delta = q.get_delta_weight("default").float()
    q.merge()
    moved = q.base_layer.dequantize_weight().float() - before
    assert bool(((moved - delta).abs() <= delta.abs() + 1e-6).all())


def test_unmerge_restores_the_packed_weights_exactly(tiny):
    model = with_lora(quantized(tiny, "rtn-int2-asym"))
    randomize_b(model, std=0.5)
    q = model.base_model.model.model.layers[0].mlp.up_proj
    packed = q.base_layer.qweight.clone()
    ids = token_batch()
    before = logits(model, ids)
    q.merge()
    assert not torch.equal(q.base_layer.qweight, packed)
    q.unmerge()
    assert torch.equal(q.base_layer.qweight, packed) and not q.merged
    assert torch.equal(logits(model, ids), before)


def test_lora_config_resolves_all_linear_on_the_model(tiny):
    base = quantized(tiny, "rtn-int4")
    cfg = hf_compress.lora_config(base, r=4, target_modules="all-linear")
    assert set(cfg.target_modules) == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    assert any(k is hf_compress.QuantLinear for k in cfg._custom_modules)


def test_peft_reload_in_a_fresh_interpreter(tiny, tmp_path):
    """A fresh interpreter that only imports hf_compress: plain PEFT calls must find our layers."""
    model = with_lora(quantized(tiny, "rtn-int4"))
    randomize_b(model)
    model.save_pretrained(tmp_path / "adapter")
    expected = logits(model, token_batch())
    torch.save(expected, tmp_path / "expected.pt")
    script = textwrap.dedent(f"""
        import sys, torch
        import hf_compress
        import transformers as t
        from peft import PeftModel
        base = t.AutoModelForCausalLM.from_pretrained({str(tiny)!r}, quantization_config=hf_compress.RTNConfig(bits=4, group_size=32))
        model = PeftModel.from_pretrained(base, {str(tmp_path / "adapter")!r})
        ids = torch.randint(3, 128, (2, 16), generator=torch.Generator().manual_seed(0))
        with torch.no_grad(), hf_compress.kernels.use_backend("reference"):
            got = model(ids).logits
        assert torch.equal(got, torch.load({str(tmp_path / "expected.pt")!r})), "logits differ"
        print("OK")
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and "OK" in out.stdout, out.stderr[-3000:]


def test_load_adapter_checks_shapes(tiny, tmp_path):
    model = with_lora(quantized(tiny, "rtn-int4"))
    model.save_pretrained(tmp_path / "adapter")
    again = hf_compress.load_adapter(quantized(tiny, "rtn-int4"), str(tmp_path / "adapter"))
    assert isinstance(again, PeftModel)
    wider = t.LlamaConfig(hidden_size=96, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                          num_key_value_heads=2, max_position_embeddings=128, vocab_size=128)
    torch.manual_seed(0)
    t.AutoModelForCausalLM.from_config(wider).save_pretrained(tmp_path / "wider")
    other = t.AutoModelForCausalLM.from_pretrained(tmp_path / "wider", quantization_config=hf_compress.RTNConfig(bits=4, group_size=32))
    with pytest.raises(ValueError, match=r"has (in|out)_features=96: the adapter was trained on a model with other layer sizes"):
        hf_compress.load_adapter(other, str(tmp_path / "adapter"))
    with pytest.raises(FileNotFoundError, match=r"not a saved PEFT adapter"):
        hf_compress.load_adapter(other, str(tmp_path))


# -- bad input ----------------------------------------------------------------------------------------------------
def test_lora_on_a_qat_layer_is_refused(tiny):
    model = hf_compress.prepare_qat(t.AutoModelForCausalLM.from_pretrained(tiny), hf_compress.QATConfig(bits=4, group_size=32))
    with pytest.raises(ValueError, match=r"LoRA cannot wrap this layer: a QAT layer.*convert_qat"):
        get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj"]))


def test_lora_on_a_training_bitlinear_is_refused(tiny):
    model = t.AutoModelForCausalLM.from_pretrained(tiny, quantization_config=hf_compress.BitLinearConfig(mode="training"))
    with pytest.raises(ValueError, match=r"LoRA cannot wrap this layer: a training-mode BitLinear.*pack_bitlinear"):
        get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj"]))


def test_merging_into_a_normalising_layer_is_refused(tiny):
    model = with_lora(t.AutoModelForCausalLM.from_pretrained(tiny, quantization_config=hf_compress.BitLinearConfig(sub_ln=True)))
    with pytest.raises(ValueError, match=r"cannot be folded into its weight: keep the adapter unmerged"):
        model.merge_and_unload()


def test_dora_is_refused(tiny):
    with pytest.raises(ValueError, match=r"use_dora needs the base layer's float weight"):
        get_peft_model(quantized(tiny, "rtn-int4"), LoraConfig(r=4, target_modules=["q_proj"], use_dora=True))
