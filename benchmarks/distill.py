"""Knowledge distillation: DistillationTrainer's losses and modes side by side with TRL, one budget for all.

Teacher: ``../shared/models/pydoc-llama-6m``. Student: a 2-block, hidden-256 Llama with the teacher's
tokenizer and shapes (``student_from_teacher(teacher, 2, init="random")``), and, as a second group, the same
student initialised from the teacher's blocks 0 and 5. Every row trains the same steps, batch, sequence
length, learning rate, schedule and seed on ``pydoc-calib.txt`` cut into 128-token chunks, and is scored by
perplexity on ``pydoc-heldout.txt`` (the project's convention: first 20,000 tokens, 256-token windows).

Rows: CE only; soft KD (forward KL); soft + hidden-state MSE; reverse KL; JSD β=0.5; on-policy λ=0.5 (GKD);
offline top-k teacher logits (precomputed once, no teacher in memory while training); sequence-level KD (CE
on teacher generations: each chunk's first 32 tokens as the prompt, 96 sampled teacher tokens); then TRL's
``DistillationTrainer`` and its GKD trainer (off-policy, λ=0, forward KL; fed as ``trl_runner.py`` says: TRL 1.16's
``DistillationTrainer`` has no off-policy mode, so its student generation is replaced by the chunk itself) on
the same chunks, against our forward-KL-only row (α=1, TRL's loss). Seconds per
step are the median over the run's steps, measured by a callback, all rows in one process.

    python benchmarks/distill.py --quick     # smoke test: 8 steps per row
    python benchmarks/distill.py             # about 30 minutes on 2 cores
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402

CALIB = common.SHARED / "data" / "pydoc-calib.txt"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="8 steps per row, few generations")
    p.add_argument("--steps", type=int, default=None, help="optimizer steps per row (400)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--alpha", type=float, default=0.5, help="soft-loss weight of the KD rows")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--hidden-weight", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=32, help="teacher ids kept by the offline cache")
    p.add_argument("--skip-trl", action="store_true")
    p.add_argument("--only", nargs="*", default=None, help="run only these rows (by name)")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=str(common.default_out("distill")))
    args = p.parse_args(argv)
    args.steps = args.steps or (8 if args.quick else 400)
    return args


class StepTimer:
    """A TrainerCallback recording the wall time of every optimizer step."""

    def __new__(cls):
        from transformers import TrainerCallback

        class _Timer(TrainerCallback):
            def __init__(self):
                self.seconds = []

            def on_step_begin(self, args, state, control, **kw):
                self._t = time.perf_counter()

            def on_step_end(self, args, state, control, **kw):
                self.seconds.append(time.perf_counter() - self._t)

        return _Timer()


def step_seconds(times: list[float]) -> float:
    """Median seconds per step, the first steps (warm-up, allocator growth) left out."""
    return common.median(times[min(len(times) // 5, 10) :] or times)


def sequence_level_data(teacher, tokenizer, chunks, args):
    from hf_compress.distill import generate_distillation_dataset, tokenize_generations

    n = 16 if args.quick else len(chunks)
    prompts = [tokenizer.decode(chunks[i]["input_ids"][:32]) for i in range(n)]
    t0 = time.perf_counter()
    gen = generate_distillation_dataset(teacher, tokenizer, prompts, max_new_tokens=args.seq_len - 32, batch_size=64,
                                        do_sample=True, temperature=1.0, seed=args.seed)
    seconds = time.perf_counter() - t0
    return tokenize_generations(gen, tokenizer, max_length=args.seq_len, mask_prompt=False), seconds


def train_row(name, cfg, teacher, student, train, tokenizer, args, tmp) -> dict:
    from hf_compress.distill import DistillationArguments, DistillationTrainer

    fields = dict(output_dir=str(tmp / "run"), max_steps=args.steps, per_device_train_batch_size=args.batch_size,
                  learning_rate=args.lr, lr_scheduler_type="cosine", warmup_steps=max(1, args.steps // 20),
                  weight_decay=0.0, optim="adamw_torch", report_to=[], save_strategy="no", use_cpu=True,
                  disable_tqdm=True, logging_steps=max(1, args.steps // 10), seed=args.seed, data_seed=args.seed,
                  dataloader_pin_memory=False, temperature=args.temperature)
    fields.update(cfg)
    timer = StepTimer()
    trainer = DistillationTrainer(model=student, teacher_model=teacher if not cfg.get("offline_logits") else None,
                                  args=DistillationArguments(**fields), train_dataset=train, processing_class=tokenizer,
                                  callbacks=[timer])
    t0 = time.perf_counter()
    trainer.train()
    return {"train s": time.perf_counter() - t0, "s/step": step_seconds(timer.seconds)}


def evaluate(student, tokenizer) -> float:
    from hf_compress.eval import perplexity

    return perplexity(student.eval(), tokenizer, common.HELDOUT, progress=False)


def main(argv=None) -> int:
    args = parse_args(argv)
    threads = common.setup(args.threads)
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from hf_compress.distill import load_teacher_logits, precompute_teacher_logits, student_from_teacher, text_chunks

    torch.manual_seed(args.seed)
    tokenizer = AutoTokenizer.from_pretrained(common.PYDOC_MODEL)
    teacher = AutoModelForCausalLM.from_pretrained(common.PYDOC_MODEL).eval()
    chunks = text_chunks(tokenizer, CALIB, seq_len=args.seq_len)
    kd = {"alpha": args.alpha}
    rows_spec = [
        ("CE only", "random", {"alpha": 0.0}, "chunks"),
        ("soft KD (forward KL)", "random", kd, "chunks"),
        ("forward KL only (alpha=1)", "random", {"alpha": 1.0}, "chunks"),
        ("soft + hidden MSE", "random", {**kd, "hidden_loss_weight": args.hidden_weight}, "chunks"),
        ("reverse KL", "random", {**kd, "loss_type": "reverse_kl"}, "chunks"),
        ("JSD beta=0.5", "random", {**kd, "loss_type": "jsd", "beta": 0.5}, "chunks"),
        ("on-policy lambda=0.5", "random", {**kd, "on_policy_fraction": 0.5}, "chunks"),
        (f"offline top-{args.top_k} logits", "random", {**kd, "offline_logits": "cache"}, "cache"),
        ("sequence-level KD", "random", {"alpha": 0.0}, "generations"),
        ("teacher blocks: CE only", "teacher", {"alpha": 0.0}, "chunks"),
        ("teacher blocks: soft KD", "teacher", kd, "chunks"),
        ("teacher blocks: soft + hidden MSE", "teacher", {**kd, "hidden_loss_weight": args.hidden_weight}, "chunks"),
    ]
    if args.only:
        rows_spec = [r for r in rows_spec if r[0] in args.only]
    payload = {"environment": common.environment(), "threads": threads, "args": vars(args)}
    rows = []
    teacher_ppl = evaluate(teacher, tokenizer)
    rows.append({"row": "teacher (pydoc-llama-6m, 6 blocks)", "ppl": teacher_ppl})
    data_info = {"chunks": len(chunks), "tokens per step": args.batch_size * args.seq_len,
                 "epochs": args.steps * args.batch_size / len(chunks)}
    with tempfile.TemporaryDirectory(prefix="hfc-distill-") as tmp:
        tmp = Path(tmp)
        data = {"chunks": chunks}
        if any(r[3] == "cache" for r in rows_spec):
            t0 = time.perf_counter()
            data["cache"] = precompute_teacher_logits(teacher, chunks, tmp / "cache", top_k=args.top_k,
                                                      temperature=args.temperature, batch_size=16)
            meta = load_teacher_logits(tmp / "cache")[1]
            data_info["offline cache"] = {"seconds": time.perf_counter() - t0, "bytes per token": meta["bytes_per_token"],
                                          "bytes on disk": sum(f.stat().st_size for f in (tmp / "cache").rglob("*") if f.is_file())}
        if any(r[3] == "generations" for r in rows_spec):
            data["generations"], secs = sequence_level_data(teacher, tokenizer, chunks, args)
            data_info["teacher generations"] = {"rows": len(data["generations"]), "seconds": secs}
        for name, init, cfg, source in rows_spec:
            student = student_from_teacher(teacher, [0, 5] if init == "teacher" else 2, init=init, seed=args.seed)
            cfg = dict(cfg)
            if cfg.get("offline_logits"):
                cfg["offline_logits"] = str(tmp / "cache")
            res = train_row(name, cfg, teacher, student, data[source], tokenizer, args, tmp)
            row = {"row": name, "init": init, "ppl": evaluate(student, tokenizer), **res}
            print(f"  {name}: ppl {row['ppl']:.2f}, {row['s/step']:.3f} s/step", file=sys.stderr)
            rows.append(row)
        if not args.skip_trl:
            rows += run_trl_rows(teacher, chunks, tokenizer, args, tmp)
    by = {r["row"]: r for r in rows}
    ce = by.get("CE only")
    for r in rows:
        if ce and "ppl" in r:
            r["ppl / CE only"] = r["ppl"] / ce["ppl"]
        if "s/step" in r and "soft KD (forward KL)" in by:
            r["s/step / soft KD"] = r["s/step"] / by["soft KD (forward KL)"]["s/step"]
    cols = ["row", "init", "ppl", "ppl / CE only", "s/step", "s/step / soft KD", "train s"]
    print(f"## Distillation: {args.steps} steps x {args.batch_size} x {args.seq_len} tokens, lr {args.lr} (AdamW, "
          f"cosine, 5% warm-up), alpha {args.alpha}, T {args.temperature}, {threads} threads\n")
    print(common.markdown_table(rows, cols))
    print(f"\n{data_info}")
    floors = make_floors(by)
    print("\n" + common.floors_table(floors) + "\n")
    payload.update(rows=rows, data=data_info, floors=floors)
    out = common.write_json(args.out, payload)
    print(f"wrote {out}")
    return 0


def run_trl_rows(teacher, chunks, tokenizer, args, tmp) -> list[dict]:
    from hf_compress.distill import student_from_teacher

    try:
        from trl_runner import run_trl
    except ImportError as e:
        print(f"  TRL rows not measured: {e}", file=sys.stderr)
        return []
    rows = []
    for kind in ("trl-distillation", "trl-gkd"):
        student = student_from_teacher(teacher, 2, init="random", seed=args.seed)
        t0 = time.perf_counter()
        try:
            res = run_trl(kind, teacher, student, chunks, tokenizer, steps=args.steps, batch_size=args.batch_size,
                          learning_rate=args.lr, temperature=args.temperature, beta=0.0, seed=args.seed,
                          output_dir=str(tmp / kind), lr_scheduler_type="cosine", warmup_steps=max(1, args.steps // 20))
        except Exception as e:  # noqa: BLE001 - reported in the table, not fatal
            rows.append({"row": kind, "init": "random", "note": f"{type(e).__name__}: {str(e)[:160]}"})
            continue
        row = {"row": kind, "init": "random", "ppl": evaluate(student, tokenizer), "s/step": step_seconds(res["step_seconds"]),
               "train s": time.perf_counter() - t0, "how fed": res.get("how_fed"), "loss": res.get("loss_note")}
        print(f"  {kind}: ppl {row['ppl']:.2f}, {row['s/step']:.3f} s/step", file=sys.stderr)
        rows.append(row)
    return rows


def make_floors(by: dict) -> list[dict]:
    out = []
    ce, soft = by.get("CE only"), by.get("soft KD (forward KL)")
    if ce and soft:
        out.append(common.floor_row("soft KD ppl / CE-only ppl", soft["ppl"] / ce["ppl"], "<=", 0.97))
    hid = by.get("soft + hidden MSE")
    if soft and hid:
        out.append(common.floor_row("soft + hidden ppl / soft ppl", hid["ppl"] / soft["ppl"], "<=", 1.0))
    pure = by.get("forward KL only (alpha=1)")
    for kind in ("trl-distillation", "trl-gkd"):
        if pure and "s/step" in by.get(kind, {}):
            out.append(common.floor_row(f"forward KL s/step / {kind} s/step", pure["s/step"] / by[kind]["s/step"], "<=", 1.0))
    off = next((r for n, r in by.items() if n.startswith("offline")), None)
    if soft and off:
        out.append(common.floor_row("online s/step / offline s/step", soft["s/step"] / off["s/step"], ">=", 1.3))
    return out


if __name__ == "__main__":
    sys.exit(main())
