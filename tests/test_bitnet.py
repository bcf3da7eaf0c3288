"""BitNet (1.58-bit and 1-bit) and OneBit: quantizers, SVID, packing, layers, from_pretrained in training and
inference modes, packing a trained model, transformers' bitnet format both ways, CLI and bad input."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers as t
from conftest import PYDOC_MODEL, make_tiny, needs_pydoc
from safetensors.torch import load_file

import hf_compress
from hf_compress import BitLinearConfig, OneBitConfig, PackedBitLinear
from hf_compress.nn.bitlinear import BitLinear, OneBitLinear
from hf_compress.quant import lowbit as LB

STOCK = Path(__file__).parent / "scripts" / "stock_bitnet.py"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_tiny("llama", tmp_path_factory.mktemp("bitnet-tiny") / "m")


def ids(seed=0, n=12):
    return torch.randint(3, 128, (2, n), generator=torch.Generator().manual_seed(seed))


# -- quantizers and layout ----------------------------------------------------------------------------------
def test_ternary_absmean_and_binary_sign():
    w = torch.tensor([[0.3, -0.05, -0.9, 0.0], [0.1, 0.2, -0.2, 0.5]])
    codes, gamma = LB.ternary_absmean(w)
    assert gamma.item() == pytest.approx(w.abs().mean().item())  # 0.28125
    assert codes.tolist() == [[1, 0, -1, 0], [0, 1, -1, 1]]  # round(clip(w / 0.28125, -1, 1))
    pc_codes, pc_gamma = LB.ternary_absmean(w, per_channel=True)
    assert pc_gamma.tolist() == pytest.approx([0.3125, 0.25])
    assert pc_codes.tolist() == [[1, 0, -1, 0], [0, 1, -1, 1]]
    b, beta = LB.binary_sign(w)  # sign(w - mean(w)), mean = -0.00625; 0 maps to +1
    assert b.tolist() == [[1, -1, -1, 1], [1, 1, -1, 1]] and beta.item() == pytest.approx(0.28125)


@pytest.mark.parametrize("k", [64, 256, 300, 704])
def test_packing_round_trips_and_layout(k):
    g = torch.Generator().manual_seed(k)
    c = torch.randint(-1, 2, (7, k), generator=g).to(torch.int8)
    p = LB.pack_ternary(c)
    assert p.dtype == torch.uint8 and p.shape == (7, LB.padded_width(k, 2) // 4)
    assert torch.equal(LB.unpack_ternary(p, k), c)
    s = torch.where(torch.rand(7, k, generator=g) > 0.5, 1, -1).to(torch.int8)
    assert torch.equal(LB.unpack_binary(LB.pack_binary(s), k), s)
    one = torch.zeros(1, 256, dtype=torch.int8)
    one[0, 64 * 2 + 5] = 1  # column 64*s + j of block 0 lives in byte j at bits 2s
    assert LB.pack_ternary(one)[0, 5].item() == 1 | (1 << 2) | (2 << 4) | (1 << 6)
    with pytest.raises(ValueError, match="codes must be -1, 0 or 1"):
        LB.pack_ternary(torch.full((1, 4), 2, dtype=torch.int8))


@needs_pydoc
def test_svid_beats_sign_times_mean_on_every_linear():
    """The OneBit proposition: ‖W − sign(W) ⊙ a bᵀ‖ < ‖W − sign(W)·mean|W|‖, on every linear of pydoc-llama-6m."""
    model = t.AutoModelForCausalLM.from_pretrained(PYDOC_MODEL)
    n = 0
    for name, m in model.named_modules():
        if isinstance(m, torch.nn.Linear):
            w = m.weight.detach()
            sign, a, b = LB.svid(w)
            svid_err = (w - sign.float() * torch.outer(a, b)).norm()
            plain_err = (w - torch.where(w >= 0, 1.0, -1.0) * w.abs().mean()).norm()
            assert svid_err < plain_err, name
            _, a2, b2 = LB.svid(w, "power")
            assert (w - sign.float() * torch.outer(a2, b2)).norm() == pytest.approx(svid_err.item(), rel=1e-3)
            n += 1
    assert n == 43  # 6 blocks x 7 linears + the output head


def test_packed_bytes_are_a_sixteenth_of_fp32():
    layer = PackedBitLinear(2048, 5632, bits=1.58, bias=False)
    assert layer.packed_weight_bytes() <= 2048 * 5632 * 4 / 14
    assert PackedBitLinear(2048, 5632, bits=1, bias=False).packed_weight_bytes() <= 2048 * 5632 * 4 / 28


# -- layers -------------------------------------------------------------------------------------------------
def test_bitlinear_ste_strength_and_pack():
    torch.manual_seed(0)
    layer = BitLinear(40, 24, bias=True)
    torch.nn.init.normal_(layer.weight, std=0.1)
    x = torch.randn(3, 40)
    layer.strength = 0.0
    assert torch.allclose(layer(x), torch.nn.functional.linear(x, layer.weight, layer.bias))  # λ = 0: the float layer
    layer.strength = 1.0
    codes, gamma = LB.ternary_absmean(layer.weight.detach())
    from hf_compress.nn.bitlinear import fake_quant_activations

    want = torch.nn.functional.linear(fake_quant_activations(x), codes.float() * gamma, layer.bias)
    assert torch.allclose(layer(x), want, atol=1e-6)
    layer(x).sum().backward()  # straight-through: the latent weight gets the float layer's gradient at x_q
    assert layer.weight.grad is not None and layer.weight.grad.abs().sum() > 0
    packed = layer.pack()
    with hf_compress.kernels.use_backend("reference"):
        assert torch.allclose(packed(x), layer(x), atol=1e-5)
    with pytest.raises(ValueError, match=r"lambda must be in \[0, 1\]"):
        hf_compress.set_quantization_strength(torch.nn.Sequential(layer), 1.5)


def test_onebit_layer_is_svid_initialised_and_packs_exactly():
    torch.manual_seed(1)
    w = torch.randn(24, 40) * 0.05
    layer = OneBitLinear(40, 24, bias=False)
    layer.init_svid(w)
    sign, a, b = LB.svid(w)
    assert torch.equal(layer.out_scale.detach(), a) and torch.equal(layer.in_scale.detach(), b)
    x = torch.randn(5, 40)
    packed = layer.pack()
    with hf_compress.kernels.use_backend("reference"):
        assert torch.allclose(packed(x), layer(x), atol=1e-5)
    layer(x).pow(2).sum().backward()
    assert layer.in_scale.grad is not None and layer.weight.grad is not None


# -- from_pretrained ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("cfg", [BitLinearConfig(), BitLinearConfig(bits=1, per_channel=True), OneBitConfig()],
                         ids=["ternary", "binary-per-channel", "onebit"])
def test_quantize_on_load_save_reload(tiny, tmp_path, cfg):
    model = t.AutoModelForCausalLM.from_pretrained(tiny, quantization_config=cfg)
    layer = model.model.layers[0].mlp.down_proj
    assert isinstance(layer, PackedBitLinear) and model.lm_head.__class__ is torch.nn.Linear
    out = model(ids()).logits
    assert torch.isfinite(out).all()
    model.save_pretrained(tmp_path / "s")
    stored = load_file(str(tmp_path / "s" / "model.safetensors"))
    assert stored["model.layers.0.mlp.down_proj.qweight"].dtype == torch.uint8
    assert "model.layers.0.mlp.down_proj.weight" not in stored
    reloaded = t.AutoModelForCausalLM.from_pretrained(tmp_path / "s")
    assert torch.equal(reloaded(ids()).logits, out)


def test_training_mode_trains_packs_and_reloads(tiny, tmp_path):
    cfg = BitLinearConfig(mode="training", warmup_steps=4)
    model = t.AutoModelForCausalLM.from_pretrained(tiny, quantization_config=cfg)
    layer = model.model.layers[0].mlp.down_proj
    assert isinstance(layer, BitLinear) and layer.weight.requires_grad and layer.strength == 0.0
    assert model.hf_quantizer.is_trainable and model.hf_quantizer.is_qat_trainable
    from datasets import Dataset

    data = Dataset.from_dict({"input_ids": ids(1, 16).tolist(), "labels": ids(1, 16).tolist()})
    args = t.TrainingArguments(output_dir=str(tmp_path / "o"), max_steps=6, per_device_train_batch_size=2, report_to=[],
                               save_strategy="no", use_cpu=True, learning_rate=1e-3, disable_tqdm=True)
    before = layer.weight.detach().clone()
    strengths = []

    class Probe(t.TrainerCallback):
        def on_step_end(self, args, state, control, model=None, **kw):
            strengths.append(model.model.layers[0].mlp.down_proj.strength)

    trainer = t.Trainer(model=model, args=args, train_dataset=data, callbacks=[hf_compress.BitLinearWarmup(), Probe()])
    trainer.train()
    assert not torch.equal(before, layer.weight.detach())
    assert strengths[:4] == [0.25, 0.5, 0.75, 1.0] and strengths[-1] == 1.0
    trained = model(ids()).logits
    model.save_pretrained(tmp_path / "latent")  # a training checkpoint keeps the latent float weights
    again = t.AutoModelForCausalLM.from_pretrained(tmp_path / "latent")
    hf_compress.set_quantization_strength(again, 1.0)
    assert isinstance(again.model.layers[0].mlp.down_proj, BitLinear)
    assert torch.allclose(again(ids()).logits, trained, atol=1e-6)
    hf_compress.pack_bitlinear(model)
    assert isinstance(model.model.layers[0].mlp.down_proj, PackedBitLinear)
    with hf_compress.kernels.use_backend("reference"):
        assert torch.allclose(model(ids()).logits, trained, atol=1e-4)
    model.save_pretrained(tmp_path / "packed")
    assert json.loads((tmp_path / "packed" / "config.json").read_text())["quantization_config"]["mode"] == "inference"
    packed = t.AutoModelForCausalLM.from_pretrained(tmp_path / "packed")
    assert isinstance(packed.model.layers[0].mlp.down_proj, PackedBitLinear)


# -- transformers' bitnet format ----------------------------------------------------------------------------
def _stock(*args):
    env = {**os.environ, "TORCHDYNAMO_DISABLE": "1"}
    r = subprocess.run([sys.executable, str(STOCK), *map(str, args)], env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]


def test_export_loads_in_stock_transformers(tiny, tmp_path):
    model = t.AutoModelForCausalLM.from_pretrained(tiny, quantization_config=BitLinearConfig())
    hf_compress.export_bitnet(model, tmp_path / "hf")
    cfg = json.loads((tmp_path / "hf" / "config.json").read_text())["quantization_config"]
    assert (cfg["quant_method"], cfg["linear_class"], cfg["quantization_mode"], cfg["use_rms_norm"]) == ("bitnet", "bitlinear", "offline", False)
    assert cfg["modules_to_not_convert"] == ["lm_head"]
    stored = load_file(str(tmp_path / "hf" / "model.safetensors"))
    assert stored["model.layers.0.mlp.down_proj.weight"].shape == (64 // 4, 96)
    (tmp_path / "ids.json").write_text(json.dumps(ids().tolist()))
    _stock("load", tmp_path / "hf", tmp_path / "ids.json", tmp_path / "logits.safetensors")
    theirs = load_file(str(tmp_path / "logits.safetensors"))["logits"]
    ours = model(ids()).logits
    assert torch.allclose(theirs, ours, atol=1e-4, rtol=1e-4)


def test_stock_checkpoint_imports_onto_our_layers(tiny, tmp_path):
    _stock("save", tiny, tmp_path / "stock")
    (tmp_path / "ids.json").write_text(json.dumps(ids(2).tolist()))
    _stock("load", tmp_path / "stock", tmp_path / "ids.json", tmp_path / "logits.safetensors")
    theirs = load_file(str(tmp_path / "logits.safetensors"))["logits"]
    model = hf_compress.import_bitnet(tmp_path / "stock")
    assert isinstance(model.model.layers[1].self_attn.q_proj, PackedBitLinear)
    assert torch.allclose(model(ids(2)).logits, theirs, atol=1e-4, rtol=1e-4)
    model.save_pretrained(tmp_path / "ours")
    assert json.loads((tmp_path / "ours" / "config.json").read_text())["quantization_config"]["quant_method"] == "hf_compress_bitlinear"


# -- CLI ----------------------------------------------------------------------------------------------------
def test_cli_quantize_bitnet_onebit_and_export(tiny, tmp_path):
    from hf_compress.cli import main

    assert main(["quantize", str(tiny), "--method", "bitnet", "--output", str(tmp_path / "b158")]) == 0
    assert main(["quantize", str(tiny), "--method", "bitnet", "--bits", "1", "--output", str(tmp_path / "b1")]) == 0
    assert main(["quantize", str(tiny), "--method", "onebit", "--output", str(tmp_path / "ob")]) == 0
    for d, bits in (("b158", 1.58), ("b1", 1)):
        assert json.loads((tmp_path / d / "config.json").read_text())["quantization_config"]["bits"] == bits
    assert json.loads((tmp_path / "ob" / "config.json").read_text())["quantization_config"]["quant_method"] == "hf_compress_onebit"
    assert main(["export", "--format", "hf-bitnet", str(tmp_path / "b158"), "--output", str(tmp_path / "hf")]) == 0
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["quantization_config"]["quant_method"] == "bitnet"
    assert main(["export", "--format", "hf-bitnet", str(tmp_path / "b1"), "--output", str(tmp_path / "x")]) == 2
    assert main(["quantize", str(tiny), "--method", "bitnet", "--bits", "2", "--output", str(tmp_path / "y")]) == 2
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()


# -- bad input: one test each -------------------------------------------------------------------------------
def test_error_exporting_non_ternary_weights(tiny, tmp_path):
    with pytest.raises(ValueError, match="no ternary layers to export"):
        hf_compress.export_bitnet(t.AutoModelForCausalLM.from_pretrained(tiny), tmp_path / "a")
    binary = t.AutoModelForCausalLM.from_pretrained(tiny, quantization_config=BitLinearConfig(bits=1))
    with pytest.raises(ValueError, match="weights are binary"):
        hf_compress.export_bitnet(binary, tmp_path / "b")
    per_channel = t.AutoModelForCausalLM.from_pretrained(tiny, quantization_config=BitLinearConfig(per_channel=True))
    with pytest.raises(ValueError, match="one scale per output channel"):
        hf_compress.export_bitnet(per_channel, tmp_path / "c")
    onebit = t.AutoModelForCausalLM.from_pretrained(tiny, quantization_config=OneBitConfig())
    with pytest.raises(ValueError, match="OneBit layer"):
        hf_compress.export_bitnet(onebit, tmp_path / "d")
    assert not any((tmp_path / n).exists() for n in "abcd")


def test_error_bitnet_checkpoint_rows_do_not_match(tiny, tmp_path):
    model = t.AutoModelForCausalLM.from_pretrained(tiny, quantization_config=BitLinearConfig())
    hf_compress.export_bitnet(model, tmp_path / "hf")
    f = tmp_path / "hf" / "model.safetensors"
    tensors = load_file(str(f))
    tensors["model.layers.0.mlp.down_proj.weight"] = tensors["model.layers.0.mlp.down_proj.weight"][:-1].contiguous()
    from safetensors.torch import save_file

    save_file(tensors, str(f), metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"15 packed rows x 96 columns, i.e. 60 output rows, but model.layers.0.mlp.down_proj is a 96->64 layer"):
        hf_compress.import_bitnet(tmp_path / "hf")


@pytest.mark.parametrize("bad", [-0.1, 1.01])
def test_error_strength_outside_unit_interval(tiny, bad):
    model = t.AutoModelForCausalLM.from_pretrained(tiny, quantization_config=BitLinearConfig(mode="training"))
    with pytest.raises(ValueError, match=r"lambda must be in \[0, 1\]"):
        hf_compress.set_quantization_strength(model, bad)


def test_error_bad_config_fields():
    with pytest.raises(ValueError, match="bits must be 1.58"):
        BitLinearConfig(bits=2)
    with pytest.raises(ValueError, match="mode must be 'training'"):
        OneBitConfig(mode="train")
    with pytest.raises(ValueError, match="svid must be one of"):
        OneBitConfig(svid="nmf")


@pytest.mark.parametrize("cfg", [BitLinearConfig(), BitLinearConfig(bits=1), OneBitConfig(layernorm=True)], ids=["ternary", "binary", "onebit-ln"])
def test_fast_backend_matches_reference_in_a_model(tiny, cfg):
    from hf_compress.kernels.cpu.lowbit import available

    if not available():
        pytest.skip("the C++ low-bit kernel did not build here")
    model = t.AutoModelForCausalLM.from_pretrained(tiny, quantization_config=cfg, dtype=torch.bfloat16)
    layer = model.model.layers[0].mlp.down_proj
    x = torch.randn(12, 2, 96, dtype=torch.bfloat16).transpose(0, 1)  # 3-D and not contiguous
    assert hf_compress.kernels.lowbit.backend_for(layer, x) == "cpu-lowbit"
    with torch.inference_mode():
        fast = layer(x)
        with hf_compress.kernels.use_backend("reference"):
            assert layer(x).equal(fast)
            ref = model(ids()).logits
        assert torch.allclose(model(ids()).logits.float(), ref.float(), atol=1e-2)


@pytest.mark.parametrize("recipe", sorted(p.name for p in (Path(__file__).resolve().parents[1] / "configs").glob("bitnet-*.yaml")))
def test_bitnet_recipes_parse(recipe):
    import yaml

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
    import bitnet_convert
    import bitnet_from_scratch

    path = Path(__file__).resolve().parents[1] / "configs" / recipe
    parse = bitnet_from_scratch.parse if "scratch" in recipe else bitnet_convert.parse
    args = parse(["--recipe", str(path)])
    for k, v in yaml.safe_load(path.read_text()).items():
        assert getattr(args, k) == v, (recipe, k)
    assert parse(["--recipe", str(path), "--steps", "7"]).steps == 7  # flags override the recipe
