"""Bad input gets a clear error naming the problem and the fix, and writes nothing."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn
from transformers import AutoModelForCausalLM, PretrainedConfig, PreTrainedModel

from hf_compress import RTNConfig
from hf_compress.cli import main as cli_main
from hf_compress.integrations.loading import load_model


def test_config_validation_messages():
    with pytest.raises(ValueError, match=r"bits must be one of \[2, 3, 4, 8\], got 5"):
        RTNConfig(bits=5)
    with pytest.raises(ValueError, match="group_size must be -1 .* got 0"):
        RTNConfig(bits=4, group_size=0)
    with pytest.raises(ValueError, match="group_size must be -1 .* got -2"):
        RTNConfig(bits=4, group_size=-2)
    with pytest.raises(ValueError, match=r"observer must be one of \['minmax', 'mse'\], got 'kl'"):
        RTNConfig(bits=4, observer="kl")
    with pytest.raises(ValueError, match=r"unknown field\(s\) \['group'\] for RTNConfig"):
        RTNConfig(bits=4, group=128)
    with pytest.raises(ValueError, match="format_version 99, newer than this install supports"):
        RTNConfig.from_dict({"quant_method": "hf_compress_rtn", "bits": 4, "format_version": 99})
    cfg = RTNConfig(bits=3, group_size=64, sym=False, modules_to_not_convert=["lm_head"])
    assert RTNConfig.from_dict(json.loads(cfg.to_json_string())) == cfg
    assert cfg.to_dict() == {"quant_method": "hf_compress_rtn", "format_version": 2, "bits": 3, "group_size": 64,
                             "sym": False, "modules_to_not_convert": ["lm_head"], "checkpoint_format": "gptq",
                             "observer": "minmax"}
    # format 1 folders stored exact zero codes: they read as gptq_v2
    assert RTNConfig.from_dict({"quant_method": "hf_compress_rtn", "format_version": 1, "bits": 4}).checkpoint_format == "gptq_v2"
    with pytest.raises(ValueError, match="checkpoint_format must be one of"):
        RTNConfig(bits=4, checkpoint_format="marlin")


def test_missing_model_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="model not found: .*nope"):
        load_model(str(tmp_path / "nope"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="has no config.json"):
        load_model(str(tmp_path / "empty"))


@pytest.mark.parametrize(
    "argv,message",
    [
        (["--bits", "5"], "bits must be one of"),
        (["--bits", "4", "--group-size", "0"], "group_size must be -1"),
        (["--bits", "4", "--calib", "/no/such/calib.txt"], "calibration text not found"),
        (["--bits", "4", "--recipe", "/no/such/recipe.yaml"], "recipe not found"),
    ],
)
def test_cli_quantize_errors_write_nothing(argv, message, tiny_models, tmp_path, capsys):
    out = tmp_path / "out"
    assert cli_main(["quantize", str(tiny_models("llama")), *argv, "--output", str(out)]) == 2
    assert message in capsys.readouterr().err
    assert not out.exists()


def test_cli_missing_model_writes_nothing(tmp_path, capsys):
    out = tmp_path / "out"
    assert cli_main(["quantize", str(tmp_path / "missing"), "--bits", "4", "--output", str(out)]) == 2
    assert "model not found" in capsys.readouterr().err
    assert not out.exists()


class NoLinearConfig(PretrainedConfig):
    model_type = "no-linear-test"


class NoLinearModel(PreTrainedModel):
    config_class = NoLinearConfig

    def __init__(self, config):
        super().__init__(config)
        self.embed = nn.Embedding(16, 8)
        self.norm = nn.LayerNorm(8)
        self.post_init()

    def forward(self, input_ids):
        return self.norm(self.embed(input_ids))


def test_model_without_linear_layers(tmp_path):
    NoLinearModel(NoLinearConfig()).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="has no linear layers to quantize"):
        NoLinearModel.from_pretrained(tmp_path, quantization_config=RTNConfig(bits=4))


def test_checkpoint_contradicting_its_config(tiny_models, tmp_path):
    AutoModelForCausalLM.from_pretrained(tiny_models("llama"), quantization_config=RTNConfig(bits=4)).save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["quantization_config"]["bits"] = 8
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=r"qweight has shape \[8, 64\] but quantization_config \(bits=8, group_size=-1\) expects \[16, 64\]"):
        AutoModelForCausalLM.from_pretrained(tmp_path)


def test_checkpoint_with_unknown_config_field(tiny_models, tmp_path):
    AutoModelForCausalLM.from_pretrained(tiny_models("llama"), quantization_config=RTNConfig(bits=4)).save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["quantization_config"]["block"] = 3
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=r"unknown field\(s\) \['block'\]"):
        AutoModelForCausalLM.from_pretrained(tmp_path)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_nan_or_inf_weights(bad, tiny_models, tmp_path):
    model = AutoModelForCausalLM.from_pretrained(tiny_models("llama"))
    with torch.no_grad():
        model.model.layers[1].mlp.up_proj.weight[3, 5] = bad
    model.save_pretrained(tmp_path / "bad")
    with pytest.raises(ValueError, match=r"model.layers.1.mlp.up_proj.weight: weight contains 1 NaN or inf values"):
        AutoModelForCausalLM.from_pretrained(tmp_path / "bad", quantization_config=RTNConfig(bits=4))
    out = tmp_path / "out"
    assert cli_main(["quantize", str(tmp_path / "bad"), "--bits", "4", "--output", str(out)]) == 2
    assert not out.exists()
