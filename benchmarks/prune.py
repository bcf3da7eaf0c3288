"""Pruning and low-rank benchmark on pydoc-llama-6m: perplexity, bytes on disk, decode speed, compression time.

Rows (calibration: 128 windows of 256 tokens of pydoc-calib, seed 0; perplexity: the first 20,000 tokens of
pydoc-heldout in 256-token windows):

- dense; magnitude, Wanda and SparseGPT at 50% unstructured and 2:4 (SparseGPT also without the refit of its kept
  weights, the paper's algorithm); Wanda and SparseGPT at 50% with OWL's
  outlier-weighted per-block schedule; SparseGPT 50% + 4-bit g128 in one pass;
- llm-compressor's SparseGPT and Wanda on the same model, the same calibration windows and settings, in its own
  venv (``bash benchmarks/llmcompressor/setup.sh``; skipped with a note when absent, or ``--no-llmcompressor``);
- structured: 25% and 50% of the MLP channels removed, before and after distillation recovery (the unpruned model
  as teacher, logits + hidden states, ``configs/prune-structured-distill.yaml``: steps and seconds given);
- low-rank: SVD, activation-aware SVD and whitened SVD at 80% and 60% of the linear parameters, the same ratio in
  every linear and with ranks allocated across linears by sensitivity;
- the 50%-MLP structured pruning applied to the 1B-shaped random Llama of ``benchmarks/speed.py``: decode tokens/s
  against the dense model in the same run.

Speed is a ratio to the dense model measured in the same run: decode of 64 tokens after a 32-token prompt (median of
3), the row's model and the dense one measured alternately three times each, medians compared. Prints markdown tables and writes JSON.

    python benchmarks/prune.py                 # everything (~25 min on 2 cores, more with llm-compressor)
    python benchmarks/prune.py --quick         # smoke test: 16 windows, 20 recovery steps, 2-layer 1B-shaped model
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import common

CALIB = common.SHARED / "data" / "pydoc-calib.txt"
TRAIN = common.SHARED / "data" / "pydoc-api-train.txt"
RECIPE = common.REPO_ROOT / "configs" / "prune-structured-distill.yaml"
LLMC_DIR = Path(__file__).resolve().parent / "llmcompressor"
LLMC_PY = LLMC_DIR / ".venv" / "bin" / "python"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--n-samples", type=int, default=None, help="calibration windows (128; 16 with --quick)")
    p.add_argument("--seqlen", type=int, default=256)
    p.add_argument("--recovery-steps", type=int, default=None, help="distillation steps (the recipe's; 20 with --quick)")
    p.add_argument("--layers", type=int, default=None, help="layers of the 1B-shaped model (16; 2 with --quick)")
    p.add_argument("--no-llmcompressor", action="store_true")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--out", default=str(common.default_out("prune")))
    args = p.parse_args(argv)
    args.n_samples = args.n_samples or (16 if args.quick else 128)
    args.layers = args.layers or (2 if args.quick else 16)
    return args


def linear_bytes(model) -> tuple[int, int]:
    """``(stored bytes, dense fp32 bytes)`` of the compressed linears."""
    stored = dense = 0
    for m in model.modules():
        packed = getattr(m, "packed_weight_bytes", None)
        if callable(packed):
            stored += packed()
            dense += m.in_features * m.out_features * 4
    return stored, dense


def disk_bytes(model, tmp: Path, name: str) -> int:
    out = tmp / name
    model.save_pretrained(out)
    return sum(f.stat().st_size for f in out.glob("*.safetensors"))


def decode_speed(model, tokenizer) -> float:
    from hf_compress.eval import tokens_per_second

    return tokens_per_second(model.eval(), tokenizer, prompt_len=32, new_tokens=64, prefill_len=64, repeats=3)["decode_tok_s"]


def paired_decode(model, reference, tokenizer, rounds: int = 3) -> tuple[float, float]:
    """``(model tok/s, model / reference)``: the two measured alternately, ``rounds`` times each, medians compared,
    so that a change in the machine's load hits both alike."""
    ours, theirs = [], []
    for _ in range(rounds):
        ours.append(decode_speed(model, tokenizer))
        theirs.append(decode_speed(reference, tokenizer))
    return common.median(ours), common.median(ours) / common.median(theirs)


def run_llmc(args, method, sparsity, mask, calib_file, eval_file, workdir) -> dict | None:
    out = Path(workdir) / f"llmc-{method}-{mask.replace(':', '_')}.json"
    cmd = [str(LLMC_PY), str(LLMC_DIR / "run_prune.py"), "--model", str(common.PYDOC_MODEL), "--calib-tokens", str(calib_file),
           "--eval-tokens", str(eval_file), "--method", method, "--sparsity", str(sparsity), "--mask-structure", mask,
           "--out", str(out)]
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    return common.run_json_script(cmd, out)


def recover(student, teacher, tokenizer, args, tmp) -> tuple[int, float]:
    import yaml

    from hf_compress.distill import DistillationArguments, DistillationTrainer, text_chunks

    distill = dict(yaml.safe_load(RECIPE.read_text())["distill"])
    seq_len = distill.pop("seq_len")
    if args.recovery_steps or args.quick:
        distill["max_steps"] = args.recovery_steps or 20
    data = text_chunks(tokenizer, TRAIN, seq_len=seq_len)
    targs = DistillationArguments(output_dir=str(tmp / "distill"), report_to=[], save_strategy="no", logging_steps=50,
                                  disable_tqdm=True, dataloader_pin_memory=False, **distill)
    start = time.perf_counter()
    DistillationTrainer(model=student.train(), teacher_model=teacher, args=targs, train_dataset=data, processing_class=tokenizer).train()
    return distill["max_steps"], time.perf_counter() - start


def speed_1b(args, tmp) -> dict:
    """Dense vs 50%-MLP structured on the 1B-shaped random Llama: decode tokens/s in the same run."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    import hf_compress

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=args.layers,
                      num_attention_heads=32, num_key_value_heads=4, max_position_embeddings=2048, tie_word_embeddings=False)
    model = LlamaForCausalLM(cfg).eval()
    ids = torch.randint(0, 32000, (8, 128), generator=torch.Generator().manual_seed(0))
    dense = [decode_speed(model, None)]
    params_dense = sum(p.numel() for p in model.parameters())
    hf_compress.prune_structured(model, hf_compress.StructuredPruneConfig(mlp_ratio=0.5, dataset=ids, n_samples=8, seqlen=128))
    pruned = [decode_speed(model, None)]
    dense_again = LlamaForCausalLM(cfg).eval()  # alternate once more so drift in machine load shows
    dense.append(decode_speed(dense_again, None))
    pruned.append(decode_speed(model, None))
    d, p = common.median(dense), common.median(pruned)
    return {"layers": args.layers, "dense tok/s": d, "pruned tok/s": p, "speedup": p / d,
            "params dense": params_dense, "params pruned": sum(q.numel() for q in model.parameters())}


def main(argv=None) -> int:
    args = parse_args(argv)
    threads = common.setup(args.threads)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import hf_compress
    from hf_compress.eval import perplexity
    from hf_compress.eval.perplexity import tokenize_windows
    from hf_compress.integrations.calibration import calibration_windows

    tok = AutoTokenizer.from_pretrained(common.PYDOC_MODEL)
    text = common.HELDOUT.read_text()
    windows = calibration_windows(str(CALIB), tok, args.n_samples, args.seqlen, seed=0)

    def ppl(model) -> float:
        return perplexity(model.eval(), tok, text, progress=False)

    tmp = Path(tempfile.mkdtemp(prefix="hfc-prune-"))
    dense_model = AutoModelForCausalLM.from_pretrained(common.PYDOC_MODEL).eval()
    dense = {"row": "dense", "ppl": ppl(dense_model), "disk MB": disk_bytes(dense_model, tmp, "dense") / 1e6,
             "decode tok/s": decode_speed(dense_model, tok)}
    rows = [dense]

    def add(name, family, config=None, model=None, extra=None):
        start = time.perf_counter()
        if model is None:
            model = AutoModelForCausalLM.from_pretrained(common.PYDOC_MODEL, quantization_config=config)
        seconds = time.perf_counter() - start
        stored, dense_b = linear_bytes(model)
        row = {"row": name, "family": family, "ppl": ppl(model), "compress s": seconds,
               "linear bytes / dense": stored / dense_b if dense_b else None,
               "disk MB": disk_bytes(model, tmp, name.replace(" ", "_").replace(":", "-").replace("%", "")) / 1e6,
               **(extra or {})}
        row["decode tok/s"], row["decode / dense"] = paired_decode(model, dense_model, tok)
        row["ppl loss"] = row["ppl"] - dense["ppl"]
        rows.append(row)
        print(common.markdown_table([row], list(row)), file=sys.stderr, flush=True)
        return model

    calib = dict(dataset=windows, n_samples=args.n_samples, seqlen=args.seqlen)
    for target, kw in (("50%", {"sparsity": 0.5}), ("2:4", {"pattern": "2:4"})):
        add(f"magnitude {target}", "prune", hf_compress.MagnitudePruneConfig(**kw))
        add(f"Wanda {target}", "prune", hf_compress.WandaConfig(**kw, **calib))
        add(f"SparseGPT {target}", "prune", hf_compress.SparseGPTConfig(**kw, **calib))
        # the paper's algorithm (no refit of the kept weights), like for like with llm-compressor's
        add(f"SparseGPT {target} no refit", "prune", hf_compress.SparseGPTConfig(**kw, refit_steps=0, **calib))
    for name, cls in (("Wanda", hf_compress.WandaConfig), ("SparseGPT", hf_compress.SparseGPTConfig)):
        add(f"{name} 50% OWL", "prune", cls(sparsity=0.5, schedule="owl", **calib))
    add("SparseGPT 50% + int4 g128", "prune", hf_compress.SparseGPTConfig(sparsity=0.5, bits=4, group_size=128, sym=False, **calib))

    llmc_rows = []
    use_llmc = not args.no_llmcompressor and LLMC_PY.is_file()
    if not args.no_llmcompressor and not use_llmc:
        print(f"llm-compressor venv not found ({LLMC_PY}): run `bash benchmarks/llmcompressor/setup.sh`; skipping it")
    if use_llmc:
        calib_file, eval_file = tmp / "calib.json", tmp / "eval.json"
        calib_file.write_text(json.dumps(windows.tolist()))
        eval_file.write_text(json.dumps(tokenize_windows(tok, text, seqlen=256, max_tokens=20000).reshape(-1).tolist()))
        for method in ("sparsegpt", "wanda"):
            for mask in ("0:0", "2:4"):
                r = run_llmc(args, method, 0.5, mask, calib_file, eval_file, tmp)
                if r:
                    target = "50%" if mask == "0:0" else "2:4"
                    ours = next(x for x in rows if x["row"] == f"{'SparseGPT' if method == 'sparsegpt' else 'Wanda'} {target}")
                    plain = next((x for x in rows if x["row"] == f"SparseGPT {target} no refit"), None) if method == "sparsegpt" else None
                    llmc_rows.append({"row": f"llm-compressor {method} {target}", "ppl": r["ppl"], "ours ppl": ours["ppl"],
                                      "ours, no refit": plain["ppl"] if plain else None,
                                      "ours / theirs ppl": ours["ppl"] / r["ppl"], "their s": r["prune_seconds"],
                                      "our s": ours["compress s"], "measured sparsity": r["measured_sparsity"]})

    # structured + recovery
    teacher = dense_model
    for ratio in (0.75, 0.5):
        student = AutoModelForCausalLM.from_pretrained(common.PYDOC_MODEL)
        start = time.perf_counter()
        report = hf_compress.prune_structured(student, hf_compress.StructuredPruneConfig(mlp_ratio=ratio, tokenizer=tok, **calib))
        seconds = time.perf_counter() - start
        tag = f"structured MLP -{round(100 * (1 - ratio))}%"
        extra = {"params / dense": report["parameters_after"] / report["parameters_before"]}
        add(tag, "structured", model=student, extra={**extra, "compress s": seconds})
        steps, secs = recover(student, teacher, tok, args, tmp)
        add(f"{tag} + distill {steps} steps", "structured", model=student, extra={**extra, "recovery s": secs, "recovery steps": steps})

    for ratio in (0.8, 0.6):
        for method in ("svd", "asvd", "whiten"):
            for allocation in ("uniform", "sensitivity"):
                cfg = hf_compress.LowRankConfig(method=method, param_ratio=ratio, rank_allocation=allocation,
                                                **(calib if method != "svd" else {}))
                tag = "" if allocation == "uniform" else " by sensitivity"
                add(f"low-rank {method} {round(100 * ratio)}%{tag}", "low-rank", cfg)

    big = speed_1b(args, tmp)

    by = {r["row"]: r for r in rows}
    floors = []

    def removed(name, base):
        return (by[base]["ppl loss"] - by[name]["ppl loss"]) / by[base]["ppl loss"] if by[base]["ppl loss"] > 0 else None

    for target in ("50%", "2:4"):
        for m in ("Wanda", "SparseGPT"):
            floors.append(common.floor_row(f"{m} {target}: share of magnitude's ppl loss removed", removed(f"{m} {target}", f"magnitude {target}"), ">=", 0.5))
    floors.append(common.floor_row("SparseGPT 2:4 ppl / Wanda 2:4 ppl", by["SparseGPT 2:4"]["ppl"] / by["Wanda 2:4"]["ppl"], "<=", 1.0))
    for r in llmc_rows:
        floors.append(common.floor_row(f"ours / {r['row']} ppl", r["ours / theirs ppl"], "<=", 1.0))
    floors.append(common.floor_row("whitened SVD 80%: ppl loss / plain SVD 80% ppl loss",
                                   by["low-rank whiten 80%"]["ppl loss"] / by["low-rank svd 80%"]["ppl loss"], "<=", 0.5))
    s50 = "structured MLP -50%"
    recovered = next(r for r in rows if r["row"].startswith(f"{s50} + distill"))
    floors.append(common.floor_row("structured -50% MLP after recovery: share of the gap to dense recovered",
                                   (by[s50]["ppl"] - recovered["ppl"]) / (by[s50]["ppl"] - dense["ppl"]), ">=", 0.5))
    floors.append(common.floor_row("structured -50% MLP on the 1B-shaped model: decode tok/s / dense", big["speedup"], ">", 1.0))
    floors.append(common.floor_row("50% sparse linear weights: stored bytes / dense", by["SparseGPT 50%"]["linear bytes / dense"], "<=", 0.6))

    cols = ["row", "ppl", "ppl loss", "linear bytes / dense", "disk MB", "decode tok/s", "decode / dense", "compress s",
            "params / dense", "recovery steps", "recovery s"]
    print(f"## Pruning and low-rank on pydoc-llama-6m ({threads} threads; calibration {args.n_samples} x {args.seqlen} "
          "tokens of pydoc-calib; heldout perplexity)\n")
    print(common.markdown_table(rows, cols) + "\n")
    if llmc_rows:
        print("## Side by side with llm-compressor (same windows and settings)\n")
        print(common.markdown_table(llmc_rows, list(llmc_rows[0])) + "\n")
    print(f"## Structured -50% MLP on the 1B-shaped random Llama ({big['layers']} layers), decode tok/s, same run\n")
    print(common.markdown_table([big], list(big)) + "\n")
    print(common.floors_table(floors) + "\n")
    payload = {"environment": common.environment(), "threads": threads, "args": vars(args), "rows": rows,
               "llmcompressor": llmc_rows, "speed_1b": big, "floors": floors}
    print(f"wrote {common.write_json(args.out, payload)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
