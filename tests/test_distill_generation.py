"""Sequence-level distillation data (teacher generations, prompt templates) and the `hf-compress distill` CLI."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import transformers as t
from conftest import CALIB, HELDOUT, PYDOC_MODEL, needs_pydoc

from hf_compress.cli import main as cli_main
from hf_compress.distill import format_prompt, generate_distillation_dataset, text_chunks, tokenize_generations
from hf_compress.distill.student import resolve_student


def test_prompt_templates():
    assert format_prompt("Sort a list", "instruction") == "### Instruction:\nSort a list\n\n### Response:\n"
    assert format_prompt("x", "chain-of-thought").endswith("Let's think step by step.\n")
    shots = format_prompt("3+3", "in-context", examples=[("1+1", "2"), ("2+2", "4")])
    assert shots == "### Input:\n1+1\n\n### Output:\n2\n\n### Input:\n2+2\n\n### Output:\n4\n\n### Input:\n3+3\n\n### Output:\n"
    assert format_prompt("abc", "Q: {prompt}\nA:") == "Q: abc\nA:"
    with pytest.raises(ValueError, match="needs examples"):
        format_prompt("x", "in-context")
    with pytest.raises(ValueError, match="containing '{prompt}'"):
        format_prompt("x", "no placeholder")


@needs_pydoc
def test_teacher_generations_match_generate_and_train_the_student(tmp_path):
    tok = t.AutoTokenizer.from_pretrained(PYDOC_MODEL)
    teacher = t.AutoModelForCausalLM.from_pretrained(PYDOC_MODEL).eval()
    prompts = ["The os module", "A list is", "To open a file, call"]
    ds = generate_distillation_dataset(teacher, tok, prompts, template="instruction", max_new_tokens=12, batch_size=2)
    assert ds.column_names == ["prompt", "completion", "text"] and len(ds) == 3
    # greedy batched generation (left padding) equals the teacher's own generate on each prompt alone
    for row in ds:
        enc = tok(row["prompt"], return_tensors="pt")
        ref = teacher.generate(**enc, max_new_tokens=12, do_sample=False, pad_token_id=tok.pad_token_id)
        assert row["completion"] == tok.decode(ref[0, enc["input_ids"].shape[1]:], skip_special_tokens=True)
        assert row["text"] == row["prompt"] + row["completion"]
    sampled = [generate_distillation_dataset(teacher, tok, prompts, max_new_tokens=8, do_sample=True, seed=5)["completion"] for _ in range(2)]
    assert sampled[0] == sampled[1]  # seeded
    rows = tokenize_generations(ds, tok, max_length=64)
    n_prompt = len(tok(ds[0]["prompt"])["input_ids"])
    assert all(v == -100 for v in rows[0]["labels"][:n_prompt]) and rows[0]["labels"][n_prompt:] == rows[0]["input_ids"][n_prompt:]

    from hf_compress.distill import DistillationArguments, DistillationTrainer

    student = resolve_student("teacher:2", teacher)
    before = student.model.layers[0].mlp.down_proj.weight.clone()
    args = DistillationArguments(output_dir=str(tmp_path / "o"), max_steps=2, per_device_train_batch_size=2, report_to=[],
                                 save_strategy="no", use_cpu=True, alpha=0.0, disable_tqdm=True)
    DistillationTrainer(model=student, args=args, train_dataset=rows, processing_class=tok).train()
    assert not torch.equal(before, student.model.layers[0].mlp.down_proj.weight)


@needs_pydoc
def test_text_chunks_and_student_specs():
    tok = t.AutoTokenizer.from_pretrained(PYDOC_MODEL)
    ds = text_chunks(tok, CALIB, seq_len=64, max_chunks=5)
    assert len(ds) == 5 and all(len(r) == 64 for r in ds["input_ids"])
    ids = tok(CALIB.read_text())["input_ids"]
    assert ds[1]["input_ids"] == ids[64:128]  # consecutive, non-overlapping chunks of the whole text
    with pytest.raises(ValueError, match="fewer than one chunk"):
        text_chunks(tok, "too short", seq_len=64)
    teacher = t.AutoModelForCausalLM.from_pretrained(PYDOC_MODEL)
    assert resolve_student("teacher:0,5", teacher).config.num_hidden_layers == 2
    r = resolve_student("random:3", teacher, seed=1)
    assert r.config.num_hidden_layers == 3 and not torch.equal(r.model.layers[0].mlp.up_proj.weight, teacher.model.layers[0].mlp.up_proj.weight)
    with pytest.raises(ValueError, match="block indices like 0,5"):
        resolve_student("teacher:a,b", teacher)


@needs_pydoc
def test_cli_distill(tmp_path, capsys):
    small = tmp_path / "train.txt"
    small.write_text(CALIB.read_text()[:20000])
    held = tmp_path / "held.txt"
    held.write_text(HELDOUT.read_text()[:6000])
    out = tmp_path / "student"
    recipe = tmp_path / "r.yaml"
    recipe.write_text("alpha: 0.7\ntemperature: 2.0\nseq_len: 64\nhidden_loss_weight: 0.5\nstudent: teacher:0,5\n")
    rc = cli_main(["distill", "--teacher", str(PYDOC_MODEL), "--train", str(small), "--output", str(out),
                   "--recipe", str(recipe), "--max-steps", "3", "--batch-size", "2", "--eval-text", str(held)])
    assert rc == 0
    assert {"config.json", "model.safetensors", "tokenizer.json", "README.md", "hf_compress_eval.json", "training_args.json"} <= {p.name for p in out.iterdir()}
    saved = json.loads((out / "training_args.json").read_text())
    assert (saved["alpha"], saved["temperature"], saved["hidden_loss_weight"], saved["max_steps"]) == (0.7, 2.0, 0.5, 3)
    student = t.AutoModelForCausalLM.from_pretrained(out)  # a plain model: stock transformers reloads it
    assert student.config.num_hidden_layers == 2
    res = json.loads((out / "hf_compress_eval.json").read_text())
    assert res["perplexity"] > res["teacher_perplexity"] > 1
    assert cli_main(["distill", "--teacher", str(PYDOC_MODEL), "--train", str(small), "--output", str(tmp_path / "x")]) == 2
    assert "pass --student" in capsys.readouterr().err
    assert cli_main(["distill", "--teacher", str(PYDOC_MODEL), "--student", "teacher:2", "--train", str(small),
                     "--output", str(tmp_path / "x"), "--alpha", "2"]) == 2
    assert "alpha must be in [0, 1]" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("recipe", sorted(p.name for p in (Path(__file__).resolve().parents[1] / "configs").glob("distill-*.yaml")))
def test_every_distill_recipe_builds_its_arguments(recipe, tmp_path):
    from hf_compress.cli import build_parser, distill_settings, load_recipe
    from hf_compress.distill import DistillationArguments

    path = Path(__file__).resolve().parents[1] / "configs" / recipe
    args = build_parser().parse_args(["distill", "--teacher", "T", "--train", "x.txt", "--output", "o", "--recipe", str(path)])
    fields, run = distill_settings(args)
    targs = DistillationArguments(output_dir=str(tmp_path), report_to=[], **fields)
    raw = load_recipe(str(path))
    assert run == {"seq_len": raw.pop("seq_len"), "student": raw.pop("student"), "eval_text": None}
    for name, value in raw.items():
        got = getattr(targs, name)
        assert (got.value if hasattr(got, "value") else got) == value, (recipe, name)
