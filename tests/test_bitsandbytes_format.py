"""hf_compress.load_bitsandbytes_int8 / export_bitsandbytes against bitsandbytes 8-bit checkpoints written and
read by an independent fixture (tests/bnb_writer.py; no bitsandbytes needed).

Expected behaviour: the loaded model runs LLM.int8 on the stored codes. ``bnb_writer.SimulatedLLMInt8Linear``
computes that from the description (float outlier columns, per-token int8 for the rest, float64 sums); on our
``reference`` backend the logits match it to float32 rounding (2.4e-7 of the max logit measured, ``SIM_TOL =
1e-5``), while using 6.0 instead of the checkpoint's threshold 3.0 moves them by 8.9e-3 of the max, so the
tolerance tells thresholds apart. A float model with the dequantized weights differs by the activation
quantization alone (8.8e-3 of the max measured, ``DEQ_TOL = 3e-2``); the original float model by the weight
quantization too (relative L2 1.0e-2 measured, ``FLOAT_TOL = 5e-2``). The default CPU backend is held to the
weight-only kernels' bound (``FAST_TOL = 1e-2`` relative L2; 1.4e-7 measured here).
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from bnb_writer import (
    block_linear_names,
    bnb_config,
    quantize_rows,
    read_checkpoint,
    reference_models,
    write_bnb_int8_checkpoint,
)
from conftest import tiny_config, token_batch
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM, BitsAndBytesConfig
from transformers.quantizers.auto import AutoQuantizationConfig
from transformers.quantizers.base import HfQuantizer
from transformers.quantizers.quantizer_bnb_8bit import Bnb8BitHfQuantizer
from transformers.quantizers.quantizers_utils import should_convert_module

import hf_compress
from hf_compress.cli import main as cli_main
from hf_compress.kernels import use_backend

SIM_TOL = 1e-5  # reference backend vs the simulated LLM.int8 model: max |difference| / max |logit|
DEQ_TOL = 3e-2  # vs the float model with dequantized weights: max |difference| / max |logit|
FLOAT_TOL = 5e-2  # vs the original float model: ||difference|| / ||logits||
FAST_TOL = 1e-2  # default backend vs the simulated model: ||difference|| / ||logits||


def tiny_model(tie: bool = False):
    torch.manual_seed(0)
    config = tiny_config("llama")
    config.tie_word_embeddings = tie
    return AutoModelForCausalLM.from_config(config).eval()


def logits(model):
    with torch.inference_mode():
        return model(token_batch()).logits.float()


def max_rel(got, want) -> float:
    return ((got - want).abs().max() / want.abs().max()).item()


def l2_rel(got, want) -> float:
    return ((got - want).norm() / want.norm()).item()


def bnb_converted(folder, model) -> set[str]:
    """The linears transformers' bnb 8-bit loader would replace by Linear8bitLt for this checkpoint's config."""
    qc = json.loads((folder / "config.json").read_text())["quantization_config"]
    skip = HfQuantizer.get_modules_to_not_convert(model, qc["llm_int8_skip_modules"], model._keep_in_fp32_modules)
    return {n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and should_convert_module(n, skip)}


@pytest.fixture(scope="module")
def int8_folder(tmp_path_factory):
    """A tiny float Llama, quantized on load with Int8MixedConfig(threshold=3.0) and saved, plus a tokenizer-ish file."""
    root = tmp_path_factory.mktemp("int8")
    tiny_model().save_pretrained(root / "float")
    model = AutoModelForCausalLM.from_pretrained(root / "float", quantization_config=hf_compress.Int8MixedConfig(threshold=3.0))
    model.save_pretrained(root / "int8")
    (root / "int8" / "tokenizer.json").write_text('{"version": "1.0"}')
    return root / "int8"


# --------------------------------------------------------------------------------------------------------
# The fixture itself
# --------------------------------------------------------------------------------------------------------


def test_writer_follows_the_format(tmp_path):
    model = tiny_model()
    written = write_bnb_int8_checkpoint(model, tmp_path, threshold=3.0)
    tensors, config = read_checkpoint(tmp_path)
    qc = config["quantization_config"]
    assert qc == BitsAndBytesConfig(load_in_8bit=True, llm_int8_threshold=3.0).to_dict()  # what transformers writes
    assert set(written) == set(block_linear_names(model)) and len(written) == 14
    for name, q in written.items():
        w = model.get_submodule(name).weight.detach()
        codes, scb, fmt = tensors[f"{name}.weight"], tensors[f"{name}.SCB"], tensors[f"{name}.weight_format"]
        assert codes.dtype == torch.int8 and codes.shape == w.shape
        assert scb.dtype == torch.float32 and scb.shape == (w.shape[0],) and torch.equal(scb, w.abs().amax(dim=1))
        assert fmt.dtype == torch.uint8 and fmt.dim() == 0 and fmt.item() == 0
        assert torch.equal(codes.abs().amax(dim=1), torch.full((w.shape[0],), 127, dtype=torch.int8))
        assert ((q["weight"] - w).abs() <= scb[:, None] / 254 + 1e-7).all()  # round to nearest: half a step
        assert f"{name}.weight" in tensors and name + ".bias" not in tensors
    assert tensors["lm_head.weight"].dtype == torch.float32


# --------------------------------------------------------------------------------------------------------
# load_bitsandbytes_int8
# --------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("threshold", [3.0, 6.0])
def test_load_matches_llm_int8_on_the_stored_codes(threshold, tmp_path):
    model = tiny_model()
    written = write_bnb_int8_checkpoint(model, tmp_path, threshold=threshold)
    sim, deq = reference_models(model, written, threshold)
    want = logits(sim)

    loaded, info = hf_compress.load_bitsandbytes_int8(str(tmp_path), output_loading_info=True)
    loaded.eval()
    assert not info["missing_keys"] and not info["unexpected_keys"], info  # weight_format checked, then dropped
    assert "_keys_to_ignore_on_load_unexpected" not in type(loaded).__dict__  # the class is left as it was
    assert loaded.config.quantization_config.threshold == threshold
    for name, q in written.items():
        layer = loaded.get_submodule(name)
        assert isinstance(layer, hf_compress.Int8MixedLinear) and layer.threshold == threshold, name
        assert torch.equal(layer.weight, q["codes"]) and torch.equal(layer.SCB, q["scb"])
        torch.testing.assert_close(layer.dequantize_weight(), q["weight"], rtol=1e-6, atol=1e-9)
    assert isinstance(loaded.lm_head, torch.nn.Linear)

    with use_backend("reference"):
        got = logits(loaded)
    assert max_rel(got, want) < SIM_TOL
    other, _ = reference_models(model, written, 9.0 - threshold)  # the other threshold: far outside the tolerance
    assert max_rel(logits(other), want) > 100 * SIM_TOL
    assert max_rel(got, logits(deq)) < DEQ_TOL
    assert l2_rel(got, logits(model)) < FLOAT_TOL
    assert l2_rel(logits(loaded), want) < FAST_TOL


def test_skip_modules_and_zero_threshold(tmp_path):
    """llm_int8_skip_modules stay float; threshold 0 (no outlier columns) is per-token int8: dynamic W8A8."""
    model = tiny_model()
    skip = ["lm_head", "model.layers.1.mlp.down_proj"]
    written = write_bnb_int8_checkpoint(model, tmp_path, threshold=0.0, skip_modules=skip)
    assert "model.layers.1.mlp.down_proj" not in written
    loaded = hf_compress.load_bitsandbytes_int8(tmp_path).eval()
    kept = loaded.model.layers[1].mlp.down_proj
    assert type(kept) is torch.nn.Linear and torch.equal(kept.weight, model.model.layers[1].mlp.down_proj.weight)
    assert all(type(loaded.get_submodule(n)) is hf_compress.W8A8Linear for n in written)
    assert loaded.config.quantization_config.modules_to_not_convert == sorted(skip)
    with use_backend("reference"):
        assert max_rel(logits(loaded), logits(reference_models(model, written, 0.0)[0])) < SIM_TOL


# --------------------------------------------------------------------------------------------------------
# export_bitsandbytes
# --------------------------------------------------------------------------------------------------------


def test_export_writes_what_bitsandbytes_reads_and_round_trips(int8_folder, tmp_path):
    out = tmp_path / "bnb"
    assert cli_main(["export", "--format", "bitsandbytes", str(int8_folder), "--output", str(out)]) == 0
    src, _ = read_checkpoint(int8_folder)
    tensors, config = read_checkpoint(out)

    # Tensors: ours unchanged, plus one weight_format (0-d uint8, 0 = row) per quantized linear.
    quantized = {k[: -len(".SCB")] for k in src if k.endswith(".SCB")}
    assert len(quantized) == 14
    assert set(tensors) == set(src) | {f"{n}.weight_format" for n in quantized}
    for key, value in src.items():
        assert tensors[key].dtype == value.dtype and torch.equal(tensors[key], value), key
    for name in quantized:
        weight, scb, fmt = tensors[f"{name}.weight"], tensors[f"{name}.SCB"], tensors[f"{name}.weight_format"]
        assert weight.dtype == torch.int8 and weight.dim() == 2
        assert scb.dtype == torch.float32 and scb.shape == (weight.shape[0],)
        assert fmt.dtype == torch.uint8 and fmt.dim() == 0 and fmt.item() == 0
        assert all(f"{name}.{t}" in tensors for t in Bnb8BitHfQuantizer.serialized_names["weight"])

    # Config: exactly what transformers writes for BitsAndBytesConfig(load_in_8bit=True, llm_int8_threshold=3.0).
    qc = config["quantization_config"]
    assert qc == BitsAndBytesConfig(load_in_8bit=True, llm_int8_threshold=3.0).to_dict()
    parsed = AutoQuantizationConfig.from_dict(qc)
    assert isinstance(parsed, BitsAndBytesConfig) and parsed.quantization_method() == "llm_int8"
    assert bnb_converted(out, tiny_model()) == quantized  # bitsandbytes converts exactly our int8 layers
    assert (out / "tokenizer.json").read_text() == (int8_folder / "tokenizer.json").read_text()
    assert (out / "generation_config.json").is_file()

    before = AutoModelForCausalLM.from_pretrained(int8_folder).eval()
    after = hf_compress.load_bitsandbytes_int8(out).eval()
    assert after.config.quantization_config == before.config.quantization_config
    assert torch.equal(logits(after), logits(before))


def test_export_with_explicit_skips_lists_every_float_linear(tmp_path):
    """An explicit llm_int8_skip_modules replaces bitsandbytes' default skips: it must name the tied lm_head."""
    tiny_model(tie=True).save_pretrained(tmp_path / "float")
    cfg = hf_compress.Int8MixedConfig(threshold=3.0, modules_to_not_convert=["model.layers.0.mlp.down_proj"])
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "float", quantization_config=cfg).eval()
    model.save_pretrained(tmp_path / "int8")
    hf_compress.export_bitsandbytes(tmp_path / "int8", tmp_path / "bnb")
    skip = json.loads((tmp_path / "bnb" / "config.json").read_text())["quantization_config"]["llm_int8_skip_modules"]
    assert {"lm_head", "model.layers.0.mlp.down_proj"} <= set(skip)
    tensors, _ = read_checkpoint(tmp_path / "bnb")
    assert bnb_converted(tmp_path / "bnb", tiny_model(tie=True)) == {k[:-4] for k in tensors if k.endswith(".SCB")}
    reloaded = hf_compress.load_bitsandbytes_int8(tmp_path / "bnb").eval()
    assert type(reloaded.model.layers[0].mlp.down_proj) is torch.nn.Linear
    assert torch.equal(logits(reloaded), logits(model))



def test_export_of_a_sharded_folder_updates_the_index(int8_folder, tmp_path):
    model = AutoModelForCausalLM.from_pretrained(int8_folder).eval()
    model.save_pretrained(tmp_path / "int8", max_shard_size="20KB")  # weights and their SCB land in different shards
    assert len(list((tmp_path / "int8").glob("*.safetensors"))) > 2
    hf_compress.export_bitsandbytes(tmp_path / "int8", tmp_path / "bnb")
    index = json.loads((tmp_path / "bnb" / "model.safetensors.index.json").read_text())
    stored = {}
    for f in (tmp_path / "bnb").glob("*.safetensors"):
        with safe_open(str(f), "pt") as fh:
            stored.update(dict.fromkeys(fh.keys(), f.name))
    assert index["weight_map"] == stored
    assert all(stored[k] == stored[k.replace(".weight_format", ".weight")] for k in stored if k.endswith(".weight_format"))
    assert sum(k.endswith(".weight_format") for k in stored) == 14
    assert torch.equal(logits(hf_compress.load_bitsandbytes_int8(tmp_path / "bnb").eval()), logits(model))

# --------------------------------------------------------------------------------------------------------
# Errors
# --------------------------------------------------------------------------------------------------------


def _rewrite(folder, tensors=None, qc=None):
    if tensors is not None:
        save_file(tensors, str(folder / "model.safetensors"), {"format": "pt"})
    if qc is not None:
        config = json.loads((folder / "config.json").read_text())
        config["quantization_config"] = qc
        (folder / "config.json").write_text(json.dumps(config))


def test_scb_rows_mismatch_raises_before_loading(tmp_path):
    write_bnb_int8_checkpoint(tiny_model(), tmp_path)
    tensors, _ = read_checkpoint(tmp_path)
    key = "model.layers.1.self_attn.k_proj.SCB"
    tensors[key] = tensors[key][:-1].contiguous()  # [31] for a [32, 64] weight
    _rewrite(tmp_path, tensors=tensors)
    with pytest.raises(ValueError, match=r"model\.layers\.1\.self_attn\.k_proj\.SCB has shape \[31\] .*\[32, 64\].*must be \[32\].*re-save"):
        hf_compress.load_bitsandbytes_int8(tmp_path)


def test_non_row_weight_format_raises(tmp_path):
    write_bnb_int8_checkpoint(tiny_model(), tmp_path)
    tensors, _ = read_checkpoint(tmp_path)
    tensors["model.layers.0.mlp.up_proj.weight_format"] = torch.tensor(2, dtype=torch.uint8)
    _rewrite(tmp_path, tensors=tensors)
    with pytest.raises(ValueError, match=r"model\.layers\.0\.mlp\.up_proj has weight_format 2 \('col_turing'\)"):
        hf_compress.load_bitsandbytes_int8(tmp_path)


@pytest.mark.parametrize(
    "qc,match",
    [
        (bnb_config(load_in_8bit=False, _load_in_8bit=False, load_in_4bit=True, _load_in_4bit=True, bnb_4bit_quant_type="nf4"),
         r"4-bit bitsandbytes checkpoints are not supported: .*nf4"),
        (bnb_config(llm_int8_has_fp16_weight=True), "llm_int8_has_fp16_weight"),
        ({"quant_method": "gptq", "bits": 4, "group_size": 128}, r"not a bitsandbytes checkpoint.*load_gptq"),
    ],
    ids=["4bit", "fp16_weight", "gptq"],
)
def test_unsupported_configs_raise(qc, match, tmp_path):
    write_bnb_int8_checkpoint(tiny_model(), tmp_path)
    _rewrite(tmp_path, qc=qc)
    with pytest.raises(ValueError, match=match):
        hf_compress.load_bitsandbytes_int8(tmp_path)


def test_int8_layer_we_keep_in_float_raises(tmp_path):
    """An explicit skip list without lm_head makes bitsandbytes quantize it; we always keep it float."""
    model = tiny_model()
    skip = ["model.layers.1.mlp.down_proj"]
    names = [n for n in block_linear_names(model) if n not in skip] + ["lm_head"]
    write_bnb_int8_checkpoint(model, tmp_path, skip_modules=skip, names=names)
    with pytest.raises(ValueError, match=r"stores \['lm_head'\] in int8"):
        hf_compress.load_bitsandbytes_int8(tmp_path)


def test_missing_files_raise(int8_folder, tmp_path):
    with pytest.raises(FileNotFoundError, match="not found"):
        hf_compress.load_bitsandbytes_int8(str(tmp_path / "absent"))
    write_bnb_int8_checkpoint(tiny_model(), tmp_path / "bnb")
    (tmp_path / "bnb" / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="safetensors"):
        hf_compress.load_bitsandbytes_int8(tmp_path / "bnb")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        hf_compress.export_bitsandbytes(tmp_path / "absent", tmp_path / "out")
    shutil.copytree(int8_folder, tmp_path / "no_config")
    (tmp_path / "no_config" / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match="config.json"):
        hf_compress.export_bitsandbytes(tmp_path / "no_config", tmp_path / "out")
    shutil.copytree(int8_folder, tmp_path / "no_weights")
    (tmp_path / "no_weights" / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="safetensors"):
        hf_compress.export_bitsandbytes(tmp_path / "no_weights", tmp_path / "out")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "kind,match",
    [
        ("float", r"not quantized.*--method llm-int8"),
        ("rtn", r"hf_compress_rtn.*--format gptq"),
        ("w8a8", r"hf_compress_w8a8.*--method llm-int8"),
        ("bnb", "already a bitsandbytes checkpoint"),
    ],
)
def test_export_refuses_other_folders(kind, match, tiny_models, tmp_path, capsys):
    src = tiny_models("llama")
    if kind in ("rtn", "w8a8"):
        cfg = hf_compress.RTNConfig(bits=4) if kind == "rtn" else hf_compress.W8A8Config()
        AutoModelForCausalLM.from_pretrained(src, quantization_config=cfg).save_pretrained(tmp_path / kind)
        src = tmp_path / kind
    elif kind == "bnb":
        src = tmp_path / kind
        write_bnb_int8_checkpoint(tiny_model(), src)
    with pytest.raises(ValueError, match=match):
        hf_compress.export_bitsandbytes(src, tmp_path / "out")
    assert cli_main(["export", "--format", "bitsandbytes", str(src), "--output", str(tmp_path / "out")]) == 2
    assert "hf-compress: error:" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_from_pretrained_with_our_config_points_to_the_loader(tmp_path):
    write_bnb_int8_checkpoint(tiny_model(), tmp_path)
    with pytest.raises(ValueError, match="load_bitsandbytes_int8"):
        AutoModelForCausalLM.from_pretrained(tmp_path, quantization_config=hf_compress.Int8MixedConfig())


def test_quantize_rows_matches_the_format():
    w = torch.tensor([[0.5, -1.0, 0.25], [0.0, 0.0, 0.0], [3.0, 1.5, -0.75]])
    codes, absmax = quantize_rows(w)
    assert codes.tolist() == [[64, -127, 32], [0, 0, 0], [127, 64, -32]]  # 63.5 rounds to 64
    assert absmax.tolist() == [1.0, 0.0, 3.0]
