"""Quantization-aware training: LSQ fake quantization, FakeQuantLinear, prepare_qat / convert_qat, the QAT quantizer
with Trainer and DistillationTrainer, checkpoints both ways, and bad input."""

from __future__ import annotations

import pytest
import torch
import transformers as t
from conftest import token_batch

import hf_compress
from hf_compress import QATConfig, convert_qat, kernels, prepare_qat
from hf_compress.methods.rtn import rtn_quantize
from hf_compress.nn.int8_linear import W8A8Linear
from hf_compress.nn.qat_linear import FakeQuantLinear
from hf_compress.nn.quant_linear import QuantLinear
from hf_compress.quant.fake import fake_quantize_ste, lsq_grad_factor


# -- the math ---------------------------------------------------------------------------------------------------
def test_fake_quantize_values_and_lsq_gradients():
    x = torch.tensor([-1.0, -0.26, 0.0, 0.24, 0.9, 3.0], requires_grad=True)
    s = torch.tensor(0.5, requires_grad=True)
    z = torch.tensor(1.2, requires_grad=True)  # rounds to 1
    y = fake_quantize_ste(x, s, z, 0, 3)  # codes clamp(round(x/s) + 1, 0, 3)
    assert y.tolist() == pytest.approx([-0.5, -0.5, 0.0, 0.0, 1.0, 1.0])
    y.sum().backward()
    # x: 1 inside the range, 0 where clipped (-1.0 -> code -1 -> 0; 3.0 -> code 7 -> 3)
    assert x.grad.tolist() == [0.0, 1.0, 1.0, 1.0, 1.0, 0.0]
    # s: round(x/s) - x/s inside, (qmin - z) / (qmax - z) outside
    inside = [round(v / 0.5) - v / 0.5 for v in (-0.26, 0.0, 0.24, 0.9)]
    assert s.grad.item() == pytest.approx((0 - 1) + sum(inside) + (3 - 1))
    # z: 0 inside, -s outside (two clipped values)
    assert z.grad.item() == pytest.approx(-2 * 0.5)


def test_lsq_gradient_factor_scales_only_the_gradient():
    x = torch.randn(64)
    s1 = torch.tensor(0.1, requires_grad=True)
    s2 = torch.tensor(0.1, requires_grad=True)
    y1 = fake_quantize_ste(x, s1, None, -8, 7)
    y2 = fake_quantize_ste(x, s2, None, -8, 7, grad_factor=lsq_grad_factor(64, 7))
    assert torch.equal(y1, y2)
    y1.sum().backward()
    y2.sum().backward()
    assert s2.grad.item() == pytest.approx(s1.grad.item() / (64 * 7) ** 0.5, rel=1e-5)


@pytest.mark.parametrize("bits,group,sym", [(4, 32, False), (3, 64, True), (2, 64, False), (8, -1, True), (4, 40, False)])
def test_minmax_start_equals_rtn(bits, group, sym):
    torch.manual_seed(0)
    w = torch.randn(24, 96) * 0.05
    layer = FakeQuantLinear(96, 24, bits=bits, group_size=group, sym=sym, bias=False)
    layer.init_from_weight(w)
    expected = rtn_quantize(w, bits, group, sym).dequantize()
    torch.testing.assert_close(layer.fake_quantized_weight().detach(), expected, rtol=0, atol=1e-7)


@pytest.mark.parametrize("bits,group,sym", [(4, 32, False), (3, 64, True), (2, 40, False)])
def test_converted_layer_computes_the_trained_forward(bits, group, sym):
    torch.manual_seed(1)
    layer = FakeQuantLinear(96, 24, bits=bits, group_size=group, sym=sym, bias=True)
    layer.init_from_weight(torch.randn(24, 96) * 0.05)
    with torch.no_grad():  # as if trained: weights, scales and zero points moved
        layer.weight.add_(torch.randn_like(layer.weight) * 0.01)
        layer.weight_log_scale.add_(0.2 * torch.rand_like(layer.weight_log_scale))
        layer.weight_zero.add_(torch.randn_like(layer.weight_zero) * 0.7)
        layer.bias.normal_()
    x = torch.randn(3, 5, 96)
    packed = layer.to_quantized()
    assert isinstance(packed, QuantLinear) and (packed.bits, packed.group_size) == (bits, group)
    with kernels.use_backend("reference"):
        torch.testing.assert_close(packed(x), layer(x).detach(), rtol=0, atol=2e-6)


@pytest.mark.parametrize("act", ["dynamic", "static"])
def test_int8_activation_qat_converts_to_w8a8(act):
    torch.manual_seed(2)
    layer = FakeQuantLinear(64, 32, bits=8, group_size=-1, sym=True, target="int8", act=act)
    layer.init_from_weight(torch.randn(32, 64) * 0.1)
    x = torch.randn(4, 64)
    y = layer(x)  # the first batch sets a static scale
    if act == "static":
        assert layer.input_scale.item() == pytest.approx(x.abs().max().item() / 127, rel=1e-6)
    y.sum().backward()
    assert layer.weight.grad is not None and layer.weight_log_scale.grad is not None
    packed = layer.to_quantized()
    assert isinstance(packed, W8A8Linear) and (packed.static_scale is not None) == (act == "static")
    torch.testing.assert_close(packed.forward_reference(x), layer(x).detach(), rtol=1e-5, atol=1e-5)


# -- the model-level API ----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny(tiny_models):
    return tiny_models("llama")


def test_prepare_qat_starts_at_rtn_and_equals_quantize_on_load(tiny):
    ids = token_batch()
    model = prepare_qat(t.AutoModelForCausalLM.from_pretrained(tiny), QATConfig(bits=4, group_size=32))
    assert isinstance(model.model.layers[0].mlp.down_proj, FakeQuantLinear)
    assert not isinstance(model.lm_head, FakeQuantLinear)  # the output head stays float
    assert model.hf_quantizer.is_qat_trainable and model.is_quantized
    onload = t.AutoModelForCausalLM.from_pretrained(tiny, quantization_config=QATConfig(bits=4, group_size=32))
    rtn = t.AutoModelForCausalLM.from_pretrained(tiny, quantization_config=hf_compress.RTNConfig(bits=4, group_size=32, sym=False))
    with torch.no_grad(), kernels.use_backend("reference"):
        a, b, c = model(ids).logits, onload(ids).logits, rtn(ids).logits
    assert torch.equal(a, b)
    torch.testing.assert_close(a, c, rtol=0, atol=1e-5)


def _train(model, steps=6, lr=1e-3, teacher=None, tmp=None):
    from datasets import Dataset

    from hf_compress.distill import DistillationArguments, DistillationTrainer

    ids = token_batch(batch=8, length=16, seed=3).tolist()
    data = Dataset.from_dict({"input_ids": ids, "attention_mask": [[1] * 16] * 8, "labels": ids})
    kw = dict(output_dir=str(tmp), max_steps=steps, per_device_train_batch_size=8, learning_rate=lr, report_to=[],
              save_strategy="no", use_cpu=True, disable_tqdm=True, logging_steps=1, seed=0, dataloader_pin_memory=False)
    if teacher is None:
        trainer = t.Trainer(model=model, args=t.TrainingArguments(**kw), train_dataset=data)
    else:
        trainer = DistillationTrainer(model=model, teacher_model=teacher, args=DistillationArguments(alpha=1.0, **kw),
                                      train_dataset=data)
    trainer.train()
    return [h["loss"] for h in trainer.state.log_history if "loss" in h]


def test_trainer_trains_qat_model_and_learns_scales(tiny, tmp_path):
    model = prepare_qat(t.AutoModelForCausalLM.from_pretrained(tiny), QATConfig(bits=2, group_size=32))
    layer = model.model.layers[0].self_attn.q_proj
    scale0, zero0 = layer.weight_scale.detach().clone(), layer.weight_zero.detach().clone()
    losses = _train(model, steps=8, lr=5e-3, tmp=tmp_path)
    assert losses[-1] < losses[0]
    assert not torch.equal(layer.weight_scale, scale0)
    assert layer.weight_zero.requires_grad and zero0.shape == layer.weight_zero.shape
    frozen = prepare_qat(t.AutoModelForCausalLM.from_pretrained(tiny), QATConfig(bits=2, group_size=32, learn_scales=False))
    fl = frozen.model.layers[0].self_attn.q_proj
    s0 = fl.weight_scale.detach().clone()
    _train(frozen, steps=2, tmp=tmp_path)
    assert torch.equal(fl.weight_scale, s0)


def test_distillation_trainer_with_float_teacher(tiny, tmp_path):
    teacher = t.AutoModelForCausalLM.from_pretrained(tiny)
    student = prepare_qat(t.AutoModelForCausalLM.from_pretrained(tiny), QATConfig(bits=2, group_size=32))
    w0 = student.model.layers[1].mlp.up_proj.weight.detach().clone()
    losses = _train(student, steps=10, lr=1e-3, teacher=teacher, tmp=tmp_path)
    assert losses[-1] < losses[0]
    assert not torch.equal(student.model.layers[1].mlp.up_proj.weight, w0)


def test_qat_checkpoint_reloads_as_qat(tiny, tmp_path):
    model = prepare_qat(t.AutoModelForCausalLM.from_pretrained(tiny), QATConfig(bits=3, group_size=32))
    with torch.no_grad():
        model.model.layers[0].mlp.gate_proj.weight_log_scale.add_(0.1)  # state that only the checkpoint knows
    model.save_pretrained(tmp_path / "qat")
    again = t.AutoModelForCausalLM.from_pretrained(tmp_path / "qat")
    assert isinstance(again.config.quantization_config, QATConfig)
    assert isinstance(again.model.layers[0].mlp.gate_proj, FakeQuantLinear)
    ids = token_batch()
    with torch.no_grad():
        assert torch.equal(model(ids).logits, again(ids).logits)


@pytest.mark.parametrize("cfg", [QATConfig(bits=3, group_size=32), QATConfig(bits=4, group_size=-1, sym=True),
                                 QATConfig(bits=8, group_size=-1, sym=True, activations="dynamic"),
                                 QATConfig(bits=8, group_size=-1, sym=True, activations="static")],
                         ids=["int3-g32", "int4-sym", "w8a8-dynamic", "w8a8-static"])
def test_convert_save_reload_round_trip(tiny, tmp_path, cfg):
    ids = token_batch()
    model = prepare_qat(t.AutoModelForCausalLM.from_pretrained(tiny), cfg)
    _train(model, steps=2, tmp=tmp_path)
    with torch.no_grad():
        qat_logits = model(ids).logits
    convert_qat(model)
    expected = hf_compress.RTNConfig if cfg.activations is None else hf_compress.W8A8Config
    assert type(model.config.quantization_config) is expected and type(model.hf_quantizer.quantization_config) is expected
    assert not any(isinstance(m, FakeQuantLinear) for m in model.modules())
    with torch.no_grad(), kernels.use_backend("reference"):
        converted = model(ids).logits
    torch.testing.assert_close(converted, qat_logits, rtol=0, atol=1e-4)
    model.save_pretrained(tmp_path / "packed")
    again = t.AutoModelForCausalLM.from_pretrained(tmp_path / "packed")
    with torch.no_grad(), kernels.use_backend("reference"):
        assert torch.equal(again(ids).logits, converted)


def test_gpt2_conv1d_layers(tiny_models, tmp_path):
    path = tiny_models("gpt2")
    model = prepare_qat(t.AutoModelForCausalLM.from_pretrained(path), QATConfig(bits=4, group_size=32))
    ids = token_batch()
    with torch.no_grad():
        a = model(ids).logits
    convert_qat(model)
    layer = model.transformer.h[0].attn.c_attn
    assert isinstance(layer, QuantLinear) and layer.source_is_conv1d
    with torch.no_grad(), kernels.use_backend("reference"):
        torch.testing.assert_close(model(ids).logits, a, rtol=0, atol=1e-4)


# -- bad input ----------------------------------------------------------------------------------------------------
def test_convert_before_prepare_is_refused(tiny):
    model = t.AutoModelForCausalLM.from_pretrained(tiny)
    with pytest.raises(ValueError, match=r"no QAT layers.*prepare_qat"):
        convert_qat(model)


def test_prepare_on_quantized_model_is_refused(tiny):
    model = t.AutoModelForCausalLM.from_pretrained(tiny, quantization_config=hf_compress.RTNConfig(bits=4))
    with pytest.raises(ValueError, match=r"takes a float model.*hf_compress_rtn"):
        prepare_qat(model, QATConfig())


def test_bad_configs():
    with pytest.raises(ValueError, match=r"bits=8, group_size=-1, sym=True"):
        QATConfig(bits=4, activations="dynamic")
    with pytest.raises(ValueError, match=r"observer must be one of"):
        QATConfig(observer="kl")
    with pytest.raises(ValueError, match=r"bits must be one of"):
        QATConfig(bits=5)
    with pytest.raises(ValueError, match=r"takes a hf_compress.QATConfig"):
        prepare_qat(torch.nn.Linear(2, 2), hf_compress.RTNConfig())


def test_static_scale_must_be_set_before_convert():
    layer = FakeQuantLinear(16, 8, bits=8, group_size=-1, sym=True, target="int8", act="static")
    layer.init_from_weight(torch.randn(8, 16))
    with pytest.raises(ValueError, match=r"static activation scale was never set"):
        layer.to_quantized()


def test_nan_weight_is_refused():
    layer = FakeQuantLinear(16, 8, bits=4, group_size=-1)
    w = torch.randn(8, 16)
    w[0, 0] = float("nan")
    with pytest.raises(ValueError, match=r"NaN or inf"):
        layer.init_from_weight(w)
