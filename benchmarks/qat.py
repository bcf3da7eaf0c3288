"""Quantization-aware training (QAT) and quantization-aware fine-tuning (LoRA on quantized bases), measured.

QAT, on ``../shared/models/pydoc-llama-6m``: RTN post-training at 3-bit g128 and 2-bit g64 (asymmetric), then
``prepare_qat`` -> N steps -> ``convert_qat`` (the packed model is what is scored), plain (``Trainer``, cross-entropy)
and with the float model as teacher (``DistillationTrainer``, forward KL, alpha 1), beside the float model fine-tuned
with the same data, steps and schedule (so gains from extra training are not counted as recovery). Training text:
``pydoc-api-train.txt`` in 256-token chunks; perplexity on ``pydoc-heldout.txt`` (first 20,000 tokens, 256-token
windows). Recovery = (RTN ppl - QAT ppl) / (RTN ppl - reference ppl), the reference being the float model trained the
same way: for plain QAT the float model fine-tuned with cross-entropy on the same data and steps; for QAT with the
float teacher the float model distilled from itself, which is the float model (its KL loss and gradients are exactly
zero, so AdamW without weight decay leaves it unchanged). "vs float" divides by (RTN ppl - float ppl) for every row.

QAF: LoRA r=16 (alpha 32, no dropout) on every linear but the head, 256-token sequences, batch 8, fixed steps and
learning rate, on the float base, a 4-bit g128 base and a 2-bit g64 base (RTN, asymmetric), trained on
``pydoc-api-train.txt`` and scored on ``pydoc-api-eval.txt`` (modules the model never saw). Then each quantized
LoRA model is merged (``merge_and_unload``: requantized onto the base's grid), saved, reloaded and scored again.

Memory and speed: LoRA training steps on the 1B-shaped random Llama of ``benchmarks/speed.py`` (hidden 2048,
intermediate 5632, vocab 32000), fp32 base against a 4-bit g128 base, each in its own process (peak resident
memory while training, sampled every 5 ms; median seconds per step after one warm-up step), same batch and
sequence length, gradient checkpointing on for both (as QLoRA trains).

    python benchmarks/qat.py --quick     # smoke test: a few steps each, a 2-layer 1B-shaped model
    python benchmarks/qat.py             # about 50 minutes on 2 cores
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402

DATA = common.SHARED / "data"
TRAIN = DATA / "pydoc-api-train.txt"
DOMAIN_EVAL = DATA / "pydoc-api-eval.txt"
PARTS = ("qat", "qaf", "memory")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="a few steps per row, a 2-layer 1B-shaped model")
    p.add_argument("--parts", nargs="*", default=list(PARTS), choices=PARTS)
    p.add_argument("--qat-steps", type=int, default=None, help="QAT / float fine-tuning steps (500)")
    p.add_argument("--qat-lr", type=float, default=1e-4)
    p.add_argument("--lora-steps", type=int, default=None, help="LoRA steps (300)")
    p.add_argument("--lora-lr", type=float, default=1e-3)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--layers", type=int, default=None, help="layers of the 1B-shaped model (16; 2 with --quick)")
    p.add_argument("--memory-batch", type=int, default=2, help="batch of the 1B-shaped LoRA steps")
    p.add_argument("--memory-steps", type=int, default=None, help="timed steps per 1B-shaped run (3; 1 with --quick)")
    p.add_argument("--memory-child", default=None, help=argparse.SUPPRESS)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    args.qat_steps = args.qat_steps or (8 if args.quick else 500)
    args.lora_steps = args.lora_steps or (8 if args.quick else 300)
    args.layers = args.layers or (2 if args.quick else 16)
    args.memory_steps = args.memory_steps or (1 if args.quick else 3)
    args.out = args.out or str(common.default_out("qat-quick" if args.quick else "qat"))
    return args


def training_args(args, steps: int, lr: float, tmp: Path, **extra):
    fields = dict(output_dir=str(tmp / "run"), max_steps=steps, per_device_train_batch_size=args.batch_size,
                  learning_rate=lr, lr_scheduler_type="cosine", warmup_steps=max(1, steps // 20), weight_decay=0.0,
                  optim="adamw_torch", report_to=[], save_strategy="no", use_cpu=True, disable_tqdm=True,
                  logging_steps=max(1, steps // 10), seed=args.seed, data_seed=args.seed, dataloader_pin_memory=False)
    fields.update(extra)
    return fields


def train(model, data, args, steps, lr, tmp, teacher=None) -> float:
    """Train ``model`` in place (``Trainer``, or ``DistillationTrainer`` with ``teacher``); returns seconds."""
    from transformers import Trainer, TrainingArguments

    from hf_compress.distill import DistillationArguments, DistillationCollator, DistillationTrainer

    collator = DistillationCollator(pad_token_id=0)
    if teacher is None:
        trainer = Trainer(model=model, args=TrainingArguments(**training_args(args, steps, lr, tmp)),
                          train_dataset=data, data_collator=collator)
    else:
        trainer = DistillationTrainer(model=model, teacher_model=teacher,
                                      args=DistillationArguments(**training_args(args, steps, lr, tmp, alpha=1.0)),
                                      train_dataset=data, data_collator=collator)
    t0 = time.perf_counter()
    trainer.train()
    return time.perf_counter() - t0


def ppl(model, tokenizer, text) -> float:
    from hf_compress.eval import perplexity

    return perplexity(model.eval(), tokenizer, text, progress=False)


def load(**kw):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(common.PYDOC_MODEL, **kw)


# -- QAT ---------------------------------------------------------------------------------------------------------
def run_qat(args, tokenizer, data, tmp) -> tuple[list[dict], dict]:
    import torch

    import hf_compress

    rows = []
    teacher = load().eval()
    float_ppl = ppl(teacher, tokenizer, common.HELDOUT)
    rows.append({"row": "float (pydoc-llama-6m)", "ppl": float_ppl})
    torch.manual_seed(args.seed)
    tuned = load()
    secs = train(tuned, data, args, args.qat_steps, args.qat_lr, tmp)
    tuned_ppl = ppl(tuned, tokenizer, common.HELDOUT)
    rows.append({"row": f"float fine-tuned {args.qat_steps} steps", "ppl": tuned_ppl, "train s": secs})
    del tuned
    recovery = {}
    for bits, group in ((3, 128), (2, 64)):
        rtn_ppl = ppl(load(quantization_config=hf_compress.RTNConfig(bits=bits, group_size=group, sym=False)),
                      tokenizer, common.HELDOUT)
        tag = f"int{bits} g{group}"
        rows.append({"row": f"{tag} RTN", "ppl": rtn_ppl})
        for mode in ("plain", "float teacher"):
            torch.manual_seed(args.seed)
            model = hf_compress.prepare_qat(load(), hf_compress.QATConfig(bits=bits, group_size=group, sym=False))
            secs = train(model, data, args, args.qat_steps, args.qat_lr, tmp, teacher=teacher if mode != "plain" else None)
            hf_compress.convert_qat(model)
            q_ppl = ppl(model, tokenizer, common.HELDOUT)
            ref = tuned_ppl if mode == "plain" else float_ppl
            rec = (rtn_ppl - q_ppl) / (rtn_ppl - ref) if rtn_ppl > ref else float("nan")
            recovery[(tag, mode)] = rec
            rows.append({"row": f"{tag} QAT {args.qat_steps} steps, {mode}", "ppl": q_ppl, "recovered": rec,
                         "recovered vs float": (rtn_ppl - q_ppl) / (rtn_ppl - float_ppl), "train s": secs})
            print(f"  {rows[-1]['row']}: ppl {q_ppl:.2f}, recovered {rec:.3f}", file=sys.stderr)
    for r in rows:
        r["ppl / float"] = r["ppl"] / float_ppl
    return rows, recovery


# -- QAF ---------------------------------------------------------------------------------------------------------
def run_qaf(args, tokenizer, data, tmp) -> list[dict]:
    import torch
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    import hf_compress

    bases = [("float", None), ("int4 g128", dict(bits=4, group_size=128, sym=False)),
             ("int2 g64", dict(bits=2, group_size=64, sym=False))]
    rows = []
    for name, q in bases:
        base = load(quantization_config=hf_compress.RTNConfig(**q)) if q else load()
        untuned = ppl(base, tokenizer, DOMAIN_EVAL)
        torch.manual_seed(args.seed)
        model = get_peft_model(base, hf_compress.lora_config(base, r=16, lora_alpha=32, lora_dropout=0.0,
                                                             target_modules="all-linear"))
        model.print_trainable_parameters = lambda: None
        secs = train(model, data, args, args.lora_steps, args.lora_lr, tmp)
        row = {"base": name, "untuned ppl": untuned, "LoRA ppl": ppl(model, tokenizer, DOMAIN_EVAL), "train s": secs,
               "s/step": secs / args.lora_steps}
        if q:
            merged = model.merge_and_unload()
            report = hf_compress.merge_report(merged)
            row["update kept (mean)"] = sum(v["update_kept"] for v in report.values()) / len(report)
            out = tmp / f"merged-{name.replace(' ', '')}"
            merged.save_pretrained(out)
            reloaded = AutoModelForCausalLM.from_pretrained(out)
            row["merged+reloaded ppl"] = ppl(reloaded, tokenizer, DOMAIN_EVAL)
        rows.append(row)
        print(f"  LoRA on {name}: {row}", file=sys.stderr)
    by = {r["base"]: r for r in rows}
    float_lora = by["float"]["LoRA ppl"]
    for r in rows:
        r["LoRA ppl / float LoRA"] = r["LoRA ppl"] / float_lora
        if r["base"] != "float":
            gap = r["untuned ppl"] - float_lora
            r["gap closed"] = (r["untuned ppl"] - r["LoRA ppl"]) / gap if gap > 0 else float("nan")
    return rows


# -- memory and speed on the 1B-shaped model ---------------------------------------------------------------------
def memory_child(args) -> int:
    """One LoRA run in this process: ``args.memory_child`` is ``"<fp32|int4>:<checkpoint dir>:<json out>"``."""
    import torch
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    import hf_compress

    kind, ckpt, out = args.memory_child.split(":")
    q = hf_compress.RTNConfig(bits=4, group_size=128, sym=False) if kind == "int4" else None
    model = AutoModelForCausalLM.from_pretrained(ckpt, quantization_config=q) if q else AutoModelForCausalLM.from_pretrained(ckpt)
    model = get_peft_model(model, hf_compress.lora_config(model, r=16, lora_alpha=32, target_modules="all-linear"))
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.enable_input_require_grads()
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    g = torch.Generator().manual_seed(args.seed)
    ids = torch.randint(0, 32000, (args.memory_batch, args.seq_len), generator=g)
    times = []
    with common.PeakMemory() as mem:
        for _ in range(args.memory_steps + 1):
            t0 = time.perf_counter()
            loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            times.append(time.perf_counter() - t0)
    Path(out).write_text(json.dumps({"peak GB": mem.peak / 2**30, "base GB": mem.base / 2**30,
                                     "s/step": common.median(times[1:]), "loss": float(loss)}))
    return 0


def run_memory(args, tmp) -> list[dict]:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(args.seed)
    cfg = LlamaConfig(vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=args.layers,
                      num_attention_heads=32, num_key_value_heads=4, max_position_embeddings=2048,
                      tie_word_embeddings=False, rms_norm_eps=1e-5)
    ckpt = tmp / "llama-1b-shaped"
    LlamaForCausalLM(cfg).save_pretrained(ckpt)
    rows = []
    for kind in ("fp32", "int4"):
        out = tmp / f"{kind}.json"
        cmd = [sys.executable, __file__, "--memory-child", f"{kind}:{ckpt}:{out}", "--seq-len", str(args.seq_len),
               "--memory-batch", str(args.memory_batch), "--memory-steps", str(args.memory_steps), "--seed", str(args.seed)]
        if args.threads:
            cmd += ["--threads", str(args.threads)]
        subprocess.run(cmd, check=True)
        rows.append({"base": "fp32 (float LoRA)" if kind == "fp32" else "int4 g128 (QAF)", **json.loads(out.read_text())})
    for r in rows:
        r["peak / float"] = r["peak GB"] / rows[0]["peak GB"]
        r["s/step / float"] = r["s/step"] / rows[0]["s/step"]
    return rows


def make_floors(recovery, qaf, memory) -> list[dict]:
    floors = []
    if recovery:
        floors.append(common.floor_row("QAT with float teacher, int2 g64: share of RTN's loss recovered",
                                       recovery.get(("int2 g64", "float teacher")), ">=", 0.5))
    if qaf:
        by = {r["base"]: r for r in qaf}
        floors.append(common.floor_row("LoRA on the int2 g64 base: share of the gap to float LoRA closed",
                                       by["int2 g64"].get("gap closed"), ">=", 0.5))
        floors.append(common.floor_row("LoRA on the int4 g128 base: ppl / float LoRA ppl",
                                       by["int4 g128"]["LoRA ppl / float LoRA"], "<=", 1.02))
    if memory:
        floors.append(common.floor_row("QAF peak training memory / float LoRA (1B-shaped)", memory[1]["peak / float"], "<=", 0.6))
        floors.append(common.floor_row("QAF seconds per step / float LoRA (1B-shaped)", memory[1]["s/step / float"], "<=", 1.5))
    return floors


def main(argv=None) -> int:
    args = parse_args(argv)
    threads = common.setup(args.threads)
    if args.memory_child:
        return memory_child(args)
    from transformers import AutoTokenizer

    from hf_compress.distill import text_chunks

    tokenizer = AutoTokenizer.from_pretrained(common.PYDOC_MODEL)
    data = text_chunks(tokenizer, TRAIN, seq_len=args.seq_len)
    payload = {"environment": common.environment(), "threads": threads, "args": vars(args)}
    qat_rows, recovery, qaf_rows, memory_rows = [], {}, [], []
    with tempfile.TemporaryDirectory(prefix="hfc-qat-") as tmp:
        tmp = Path(tmp)
        if "qat" in args.parts:
            qat_rows, recovery = run_qat(args, tokenizer, data, tmp)
            print(f"## QAT on pydoc-llama-6m: {args.qat_steps} steps x {args.batch_size} x {args.seq_len} tokens of "
                  f"pydoc-api-train, lr {args.qat_lr} (AdamW, cosine, 5% warm-up), heldout perplexity, {threads} threads\n")
            print(common.markdown_table(qat_rows, ["row", "ppl", "ppl / float", "recovered", "recovered vs float", "train s"]) + "\n")
        if "qaf" in args.parts:
            qaf_rows = run_qaf(args, tokenizer, data, tmp)
            print(f"## LoRA r=16 on all linears: {args.lora_steps} steps x {args.batch_size} x {args.seq_len} tokens of "
                  f"pydoc-api-train, lr {args.lora_lr}, pydoc-api-eval perplexity, {threads} threads\n")
            print(common.markdown_table(qaf_rows, ["base", "untuned ppl", "LoRA ppl", "LoRA ppl / float LoRA", "gap closed",
                                                   "update kept (mean)", "merged+reloaded ppl", "s/step"]) + "\n")
        if "memory" in args.parts:
            memory_rows = run_memory(args, tmp)
            print(f"## LoRA training on the 1B-shaped Llama ({args.layers} layers), batch {args.memory_batch} x "
                  f"{args.seq_len}, gradient checkpointing, {threads} threads\n")
            print(common.markdown_table(memory_rows, ["base", "peak GB", "peak / float", "s/step", "s/step / float"]) + "\n")
    floors = make_floors(recovery, qaf_rows, memory_rows)
    print(common.floors_table(floors) + "\n")
    payload.update(qat=qat_rows, qaf=qaf_rows, memory=memory_rows, floors=floors,
                   recovery={f"{k[0]} {k[1]}": v for k, v in recovery.items()})
    print(f"wrote {common.write_json(args.out, payload)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
