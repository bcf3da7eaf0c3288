"""GPTQ through transformers: calibrate-after-load, the layer-wise driver, save/reload, export, CLI, errors."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import CALIB, PYDOC_MODEL, needs_pydoc, token_batch
from safetensors import safe_open
from transformers import AutoModel, AutoModelForCausalLM

import hf_compress
from hf_compress import GPTQConfig, QuantLinear, RTNConfig
from hf_compress.integrations.calibration import calibration_windows
from hf_compress.integrations.layerwise import find_blocks
from hf_compress.quant.layout import unpack_qzeros

ARCHS = ["llama", "qwen2", "mistral", "gpt2", "opt", "bert"]


def calib_ids(n=8, seqlen=32, seed=1):
    return torch.randint(3, 128, (n, seqlen), generator=torch.Generator().manual_seed(seed))


def gptq(**kw):
    kw.setdefault("dataset", calib_ids())
    kw.setdefault("n_samples", 8)
    kw.setdefault("seqlen", 32)
    return GPTQConfig(**kw)


def load(path, arch, **kw):
    auto = AutoModel if arch == "bert" else AutoModelForCausalLM
    return auto.from_pretrained(path, **kw).eval()


def output(model, ids):
    # the reference kernel: exact float32 maths, so comparisons measure quantization, not bf16 kernels
    with torch.no_grad(), hf_compress.kernels.use_backend("reference"):
        out = model(input_ids=ids)
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


def packed(model) -> dict[str, torch.Tensor]:
    return {n: t.clone() for n, t in model.state_dict().items() if n.endswith(("qweight", "qzeros", "scales", "g_idx"))}


@pytest.mark.parametrize("arch", ARCHS)
def test_gptq_every_architecture_quantizes_saves_and_reloads(arch, tiny_models, tmp_path):
    path = tiny_models(arch)
    ref = load(path, arch)
    model = load(path, arch, quantization_config=gptq(bits=4, group_size=32))
    _, blocks = find_blocks(model)
    block_linears = [m for m in blocks.modules() if isinstance(m, QuantLinear)]
    assert len(block_linears) >= 2 * 4  # every linear of both blocks
    assert not any(isinstance(m, torch.nn.Linear) for m in blocks.modules())
    ids = token_batch()
    out, out_ref = output(model, ids), output(ref, ids)
    rel = (out - out_ref).norm() / out_ref.norm()
    assert rel < 0.25, rel  # random tiny weights are hard to quantize; quality is measured on pydoc-llama
    model.save_pretrained(tmp_path / "q")
    cfg = json.loads((tmp_path / "q" / "config.json").read_text())["quantization_config"]
    assert cfg["quant_method"] == "hf_compress_gptq" and "dataset" not in cfg and "tokenizer" not in cfg
    reloaded = load(tmp_path / "q", arch)
    assert torch.equal(output(reloaded, ids), out)
    assert torch.allclose(output(reloaded.dequantize(), ids), out, atol=1e-3 * out.abs().max().item())


def test_gptq_beats_rtn_on_the_layer_outputs(tiny_models):
    path = tiny_models("llama")
    ids = calib_ids(4, 32, seed=7)
    ref = output(load(path, "llama"), ids)
    errs = {}
    for name, cfg in [("rtn", RTNConfig(bits=3, group_size=32)), ("gptq", gptq(bits=3, group_size=32, n_samples=8))]:
        errs[name] = ((output(load(path, "llama", quantization_config=cfg), ids) - ref).norm() / ref.norm()).item()
    assert errs["gptq"] < errs["rtn"], errs


def test_gptq_is_deterministic_and_act_order_sets_g_idx(tiny_models):
    path = tiny_models("llama")
    a = packed(load(path, "llama", quantization_config=gptq(bits=4, group_size=32, desc_act=True)))
    b = packed(load(path, "llama", quantization_config=gptq(bits=4, group_size=32, desc_act=True)))
    assert set(a) == set(b), set(a) ^ set(b)
    assert [k for k in a if not torch.equal(a[k], b[k])] == []
    g_idx = a["model.layers.0.mlp.down_proj.g_idx"]
    natural = torch.arange(g_idx.numel(), dtype=torch.int32) // 32
    assert not torch.equal(g_idx, natural)  # act-order permuted the groups
    assert torch.equal(g_idx.sort().values, natural)  # but every group still has group_size columns


def test_gptq_checkpoint_uses_v1_zeros_and_fp16_scales(tiny_models, tmp_path):
    model = load(tiny_models("llama"), "llama", quantization_config=gptq(bits=4, group_size=32, sym=False))
    layer = model.model.layers[0].self_attn.q_proj
    in_memory = unpack_qzeros(layer.qzeros, 4, layer.out_features)
    model.save_pretrained(tmp_path / "q")
    with safe_open(str(tmp_path / "q" / "model.safetensors"), "pt") as f:
        stored = unpack_qzeros(f.get_tensor("model.layers.0.self_attn.q_proj.qzeros"), 4, layer.out_features)
        assert f.get_tensor("model.layers.0.self_attn.q_proj.scales").dtype == torch.float16
    assert in_memory.min() >= 1  # v1 cannot store a zero code of 0
    assert torch.equal(stored, in_memory - 1)
    reloaded = load(tmp_path / "q", "llama").model.layers[0].self_attn.q_proj
    assert torch.equal(reloaded.qzeros, layer.qzeros)


def test_export_gptq_then_load_gptq_gives_the_same_model(tiny_models, tmp_path):
    model = load(tiny_models("llama"), "llama", quantization_config=gptq(bits=3, group_size=32, desc_act=True))
    model.save_pretrained(tmp_path / "ours")
    hf_compress.export_gptq(tmp_path / "ours", tmp_path / "gptq")
    qc = json.loads((tmp_path / "gptq" / "config.json").read_text())["quantization_config"]
    assert {k: qc[k] for k in ("quant_method", "bits", "group_size", "desc_act", "sym", "checkpoint_format")} == {
        "quant_method": "gptq", "bits": 3, "group_size": 32, "desc_act": True, "sym": True, "checkpoint_format": "gptq"
    }
    ids = token_batch()
    assert torch.equal(output(hf_compress.load_gptq(tmp_path / "gptq"), ids), output(model, ids))


def test_export_rtn_folder_converts_scales_to_fp16(tiny_models, tmp_path):
    model = load(tiny_models("llama"), "llama", quantization_config=RTNConfig(bits=4, group_size=32))
    model.save_pretrained(tmp_path / "rtn")
    hf_compress.export_gptq(tmp_path / "rtn", tmp_path / "gptq")
    with safe_open(str(tmp_path / "gptq" / "model.safetensors"), "pt") as f:
        assert f.get_tensor("model.layers.0.mlp.up_proj.scales").dtype == torch.float16
    ids = token_batch()
    out, ref = output(hf_compress.load_gptq(tmp_path / "gptq"), ids), output(model, ids)
    assert torch.allclose(out, ref, atol=1e-3 * ref.abs().max().item())  # only the fp16 rounding of scales differs


def test_gptq_with_disk_offload_gives_the_same_bits(tiny_models, tmp_path):
    path = tiny_models("llama")
    plain = packed(load(path, "llama", quantization_config=gptq(bits=4, group_size=32)))
    device_map = {"model.embed_tokens": "cpu", "model.layers.0": "disk", "model.layers.1": "disk", "model.norm": "cpu",
                  "model.rotary_emb": "cpu", "lm_head": "disk"}
    model = load(path, "llama", quantization_config=gptq(bits=4, group_size=32), device_map=device_map,
                 offload_folder=str(tmp_path / "offload"))
    offloaded = packed(model)
    assert offloaded.keys() == plain.keys()
    assert all(torch.equal(offloaded[k], plain[k]) for k in plain)
    assert output(model, token_batch()).isfinite().all()


def test_calibration_sources_agree(tiny_models):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(PYDOC_MODEL) if PYDOC_MODEL.is_dir() else None
    ids = calib_ids(4, 16)
    assert torch.equal(calibration_windows(ids, None, 4, 16), ids)  # exact windows are used as given
    a = calibration_windows(list(ids), None, 3, 8, seed=5)
    assert torch.equal(a, calibration_windows(list(ids), None, 3, 8, seed=5)) and a.shape == (3, 8)
    if tok is not None:
        text = CALIB.read_text()[:20000]
        from_file = calibration_windows(str(CALIB), tok, 4, 64, seed=0)
        from_list = calibration_windows(text.split("\n\n"), tok, 4, 64, seed=0)
        assert from_file.shape == from_list.shape == (4, 64)
        import datasets

        ds = datasets.Dataset.from_dict({"text": text.split("\n\n")})
        assert torch.equal(calibration_windows(ds, tok, 4, 64, seed=0), from_list)


def test_encoder_calibration_windows_are_framed_like_its_inputs():
    from transformers import AutoTokenizer

    from hf_compress.eval import local_minilm_path
    from hf_compress.integrations.calibration import sequence_frame

    minilm = local_minilm_path()
    if minilm is None or not PYDOC_MODEL.is_dir():
        pytest.skip("needs the MiniLM package and pydoc-llama-6m")
    bert, llama = AutoTokenizer.from_pretrained(minilm), AutoTokenizer.from_pretrained(PYDOC_MODEL)
    assert sequence_frame(bert) == ([bert.cls_token_id], [bert.sep_token_id])
    assert sequence_frame(llama) == ([], [])  # a decoder tokenizer only prepends: plain windows
    text = CALIB.read_text()[:20000]
    w = calibration_windows(text, bert, 4, 16, seed=0)
    assert w.shape == (4, 16)
    assert (w[:, 0] == bert.cls_token_id).all() and (w[:, -1] == bert.sep_token_id).all()
    stream = bert(text, add_special_tokens=False)["input_ids"]
    inner = w[0, 1:-1].tolist()  # the text between the frame is a contiguous run of the stream
    assert any(stream[i : i + 14] == inner for i in range(len(stream) - 13))
    assert not ({bert.cls_token_id, bert.sep_token_id} & set(w[:, 1:-1].flatten().tolist()))
    with pytest.raises(ValueError, match="leaves no room for text inside the tokenizer's 2 framing tokens"):
        calibration_windows(text, bert, 4, 2)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"dataset": torch.randint(3, 128, (2, 8))}, "fewer than the n_samples \\* seqlen"),
        ({"dataset": None}, "no calibration data"),
        ({"dataset": calib_ids(), "seqlen": 4096}, "exceeds the model's 128 positions"),
        ({"dataset": [" ", "  "]}, "calibration data is empty"),
    ],
)
def test_gptq_calibration_errors(kwargs, match, tiny_models):
    with pytest.raises(ValueError, match=match):
        load(tiny_models("llama"), "llama", quantization_config=GPTQConfig(bits=4, n_samples=8, **{"seqlen": 32, **kwargs}))


def test_gptq_config_errors():
    with pytest.raises(ValueError, match="bits must be one of"):
        GPTQConfig(bits=5)
    with pytest.raises(ValueError, match="damp_percent must be in"):
        GPTQConfig(damp_percent=1.5)
    with pytest.raises(ValueError, match="n_samples must be a positive integer"):
        GPTQConfig(n_samples=0)
    with pytest.raises(ValueError, match="desc_act must be True or False"):
        GPTQConfig(desc_act="yes")


def test_gptq_nan_weights_refused(tiny_models, tmp_path):
    model = load(tiny_models("llama"), "llama")
    with torch.no_grad():
        model.model.layers[1].mlp.up_proj.weight[0, 0] = float("nan")
    model.save_pretrained(tmp_path / "nan")
    with pytest.raises(ValueError, match="NaN or inf"):
        load(tmp_path / "nan", "llama", quantization_config=gptq(bits=4))


@needs_pydoc
def test_cli_quantize_gptq_and_export(tmp_path):
    from hf_compress.cli import main

    out = tmp_path / "gptq"
    rc = main(["quantize", str(PYDOC_MODEL), "--method", "gptq", "--bits", "4", "--group-size", "128", "--act-order",
               "--calib", str(CALIB), "--n-samples", "8", "--seqlen", "64", "--output", str(out)])
    assert rc == 0
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert (qc["quant_method"], qc["desc_act"], qc["n_samples"]) == ("hf_compress_gptq", True, 8)
    assert main(["export", str(out), "--format", "gptq", "--output", str(tmp_path / "exported")]) == 0
    assert json.loads((tmp_path / "exported" / "config.json").read_text())["quantization_config"]["quant_method"] == "gptq"
    assert main(["quantize", str(PYDOC_MODEL), "--method", "gptq", "--bits", "4", "--output", str(tmp_path / "x")]) == 2
    assert not (tmp_path / "x").exists()


def test_true_sequential_groups_follow_the_block(tiny_models):
    from hf_compress.integrations.layerwise import capture_block_inputs, linear_groups

    model = load(tiny_models("llama"), "llama")
    block = model.model.layers[0]
    names = [n for n, m in block.named_modules() if isinstance(m, torch.nn.Linear)]
    sample = capture_block_inputs(model, block, calib_ids(1, 16), "cpu")[0]
    assert linear_groups(block, names, sample) == [
        ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"],
        ["self_attn.o_proj"],
        ["mlp.gate_proj", "mlp.up_proj"],
        ["mlp.down_proj"],
    ]


def test_stable_outputs_find_the_children_that_return_their_last_linear(tiny_models):
    # self_attn returns (o_proj's output, None) under SDPA and mlp returns down_proj's: once those are quantized, the
    # children's outputs come from the captured inputs of o_proj / down_proj instead of another run of the child
    from hf_compress.integrations.layerwise import StableOutputs, capture_block_inputs, linear_groups

    model = load(tiny_models("llama"), "llama")
    block = model.model.layers[0]
    names = [n for n, m in block.named_modules() if isinstance(m, torch.nn.Linear)]
    sample = capture_block_inputs(model, block, calib_ids(2, 16), "cpu")[0]
    calls: list[str] = []
    groups = linear_groups(block, names, sample, calls)
    stable = StableOutputs(block, calls, names, sample)
    assert stable.tails == {"self_attn": ("self_attn.o_proj", 2), "mlp": ("mlp.down_proj", None)}
    assert [stable.tail_child([g]) for g in groups] == [None, "self_attn", None, "mlp"]
    with stable.capture_tail_inputs("self_attn"), torch.no_grad():
        block(sample[0], **sample[1])
    stable.derive("self_attn", {n for n in names if n.startswith("self_attn.")})
    with torch.no_grad():
        expected = block.self_attn(block.input_layernorm(sample[0]), **sample[1])
    (y, none), = stable.outputs["self_attn"]
    assert none is None and torch.equal(y, expected[0])


@pytest.mark.parametrize("arch", ARCHS)
def test_reused_stable_outputs_give_the_same_bits(arch, tiny_models, monkeypatch):
    # The true_sequential passes reuse the outputs of children whose linears are all quantized (a Llama block's
    # self_attn for the down_proj pass and the output pass): the packed tensors are exactly those computed by
    # running every child in every pass, and the reuse really happens.
    from hf_compress.integrations import layerwise

    path = tiny_models(arch)
    reused = []
    stored = layerwise.StableOutputs._stored
    monkeypatch.setattr(layerwise.StableOutputs, "_stored", staticmethod(lambda outs, *a, **k: reused.append(1) or stored(outs)))
    fast = packed(load(path, arch, quantization_config=gptq(bits=4, group_size=32)))
    assert reused  # every one of these architectures has a child that becomes stable before the last pass
    monkeypatch.setattr(layerwise.StableOutputs, "stable", lambda self, compressed: [])
    slow = packed(load(path, arch, quantization_config=gptq(bits=4, group_size=32)))
    assert fast.keys() == slow.keys() and len(fast) > 0
    for name in fast:
        assert torch.equal(fast[name], slow[name]), name
