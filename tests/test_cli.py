"""The hf-compress command line: quantize (flags and recipes), eval, compare, and the optimum adapter."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import HELDOUT, PYDOC_MODEL, needs_pydoc, token_batch
from transformers import AutoModelForCausalLM

import hf_compress
from hf_compress.cli import build_config, build_parser, load_recipe
from hf_compress.cli import main as cli_main

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


@needs_pydoc
def test_quantize_eval_compare(tmp_path, capsys):
    out8, out4 = tmp_path / "int8", tmp_path / "int4"
    assert cli_main(["quantize", str(PYDOC_MODEL), "--method", "rtn", "--bits", "8", "--eval-text", str(HELDOUT),
                     "--output", str(out8)]) == 0
    assert cli_main(["quantize", str(PYDOC_MODEL), "--recipe", str(CONFIGS / "rtn-int4-g128.yaml"),
                     "--eval-text", str(HELDOUT), "--output", str(out4)]) == 0
    capsys.readouterr()
    for out in (out8, out4):
        for name in ("config.json", "model.safetensors", "tokenizer.json", "generation_config.json", "README.md",
                     "hf_compress_eval.json"):
            assert (out / name).is_file(), name
        card = (out / "README.md").read_text()
        assert "pip install hf-compress" in card and "import hf_compress" in card and "perplexity" in card
    cfg4 = json.loads((out4 / "config.json").read_text())["quantization_config"]
    assert (cfg4["bits"], cfg4["group_size"]) == (4, 128)
    ppl8 = json.loads((out8 / "hf_compress_eval.json").read_text())["perplexity"]
    assert 38 < ppl8 < 41

    assert cli_main(["eval", str(out8), "--text", str(HELDOUT), "--json", "--no-speed"]) == 0
    row = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert row["perplexity"] == pytest.approx(ppl8, rel=1e-6)

    plot = tmp_path / "cmp.png"
    assert cli_main(["compare", str(out8), str(out4), "--plot", str(plot)]) == 0
    table = capsys.readouterr().out
    assert "| int8 | hf_compress_rtn | 8 | -1 |" in table and "| int4 | hf_compress_rtn | 4 | 128 |" in table
    assert plot.stat().st_size > 1000


def test_recipe_flags_override(tiny_models, tmp_path):
    out = tmp_path / "o"
    assert cli_main(["quantize", str(tiny_models("llama")), "--recipe", str(CONFIGS / "rtn-int4-g128.yaml"),
                     "--group-size", "32", "--output", str(out)]) == 0
    cfg = json.loads((out / "config.json").read_text())["quantization_config"]
    assert (cfg["bits"], cfg["group_size"], cfg["sym"]) == (4, 32, True)
    model = AutoModelForCausalLM.from_pretrained(out)
    assert isinstance(model.model.layers[0].mlp.up_proj, hf_compress.QuantLinear)


def test_observer_flag_reaches_the_weight_only_configs(tiny_models, tmp_path, capsys):
    out = tmp_path / "o"
    assert cli_main(["quantize", str(tiny_models("llama")), "--method", "rtn", "--bits", "3", "--observer", "mse",
                     "--output", str(out)]) == 0
    assert json.loads((out / "config.json").read_text())["quantization_config"]["observer"] == "mse"
    bad = tmp_path / "bad"
    assert cli_main(["quantize", str(tiny_models("llama")), "--method", "rtn", "--observer", "kl", "--output", str(bad)]) == 2
    assert "observer must be one of ['minmax', 'mse'], got 'kl'" in capsys.readouterr().err and not bad.exists()


def test_saving_over_an_existing_folder_is_atomic(tiny_models, tmp_path, monkeypatch):
    from hf_compress.integrations.save import save_compressed

    out = tmp_path / "o"
    assert cli_main(["quantize", str(tiny_models("llama")), "--bits", "8", "--output", str(out)]) == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    model = AutoModelForCausalLM.from_pretrained(tiny_models("llama"), quantization_config=hf_compress.RTNConfig(bits=4))

    def broken_save(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(model, "save_pretrained", broken_save)
    with pytest.raises(OSError, match="disk full"):
        save_compressed(model, out)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert [p.name for p in tmp_path.iterdir()] == ["o"]  # no temporary folder left behind


def test_optimum_quantizer_interface(tiny_models, tmp_path):
    from hf_compress.integrations.optimum import HfCompressOptimumQuantizer

    quantizer = HfCompressOptimumQuantizer.from_pretrained(str(tiny_models("llama")))
    quantizer.quantize(tmp_path / "q", quantization_config=hf_compress.RTNConfig(bits=4, group_size=32))
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "q")
    assert model.config.quantization_config.bits == 4
    assert torch.isfinite(model(token_batch()).logits).all()


@pytest.mark.parametrize("recipe", sorted(p.name for p in CONFIGS.glob("*.yaml") if not p.name.startswith(("distill-", "bitnet-", "prune-"))))
def test_every_recipe_builds_its_config(recipe, monkeypatch):
    # Recipes name calibration files relative to the repo root, as the README's commands run from there.
    monkeypatch.chdir(CONFIGS.parent)
    args = build_parser().parse_args(["quantize", "MODEL", "--recipe", str(CONFIGS / recipe), "--output", "unused"])
    method, config = build_config(args)
    fields = load_recipe(str(CONFIGS / recipe))
    assert method == fields.pop("method")
    calib = fields.pop("calib", None)
    if "smooth_alpha" in fields or fields.get("mode") == "static" or method == "gptq":
        assert config.dataset == calib
    for name, value in fields.items():
        assert getattr(config, name) == value, (recipe, name)
