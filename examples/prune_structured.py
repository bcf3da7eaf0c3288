"""Structured pruning + distillation recovery on pydoc-llama-6m, as configs/prune-structured-distill.yaml says.

    python examples/prune_structured.py [--recipe configs/prune-structured-distill.yaml] [--steps N] [--output DIR]

Half of every MLP's channels are removed (ranked on pydoc-calib activations); the smaller model, a standard
LlamaForCausalLM, is then distilled from the unpruned one on pydoc-api-train (logits + hidden states). Perplexity
on pydoc-heldout before pruning, after pruning and after recovery. The saved model loads without hf_compress.
"""

import argparse
import tempfile
from pathlib import Path

import yaml
from transformers import AutoModelForCausalLM, AutoTokenizer

import hf_compress
from hf_compress.distill import DistillationArguments, DistillationTrainer, text_chunks
from hf_compress.eval import perplexity

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"

p = argparse.ArgumentParser()
p.add_argument("--model", default=str(SHARED / "models" / "pydoc-llama-6m"))
p.add_argument("--recipe", default=str(ROOT / "configs" / "prune-structured-distill.yaml"))
p.add_argument("--steps", type=int, default=None, help="override the recipe's distillation max_steps")
p.add_argument("--output", default="out/pruned-recovered")
a = p.parse_args()

recipe = yaml.safe_load(Path(a.recipe).read_text())
tokenizer = AutoTokenizer.from_pretrained(a.model)
heldout = SHARED / "data" / "pydoc-heldout.txt"
teacher = AutoModelForCausalLM.from_pretrained(a.model).eval()
student = AutoModelForCausalLM.from_pretrained(a.model)
report = hf_compress.prune_structured(
    student, hf_compress.StructuredPruneConfig(**recipe["prune"], dataset=str(SHARED / "data" / "pydoc-calib.txt"), tokenizer=tokenizer))
pruned_ppl = perplexity(student.eval(), tokenizer, heldout)

distill = dict(recipe["distill"])
seq_len = distill.pop("seq_len")
if a.steps:
    distill["max_steps"] = a.steps
train = text_chunks(tokenizer, SHARED / "data" / "pydoc-api-train.txt", seq_len=seq_len)
with tempfile.TemporaryDirectory() as tmp:
    args = DistillationArguments(output_dir=tmp, report_to=[], save_strategy="no", logging_steps=50, **distill)
    DistillationTrainer(model=student.train(), teacher_model=teacher, args=args, train_dataset=train, processing_class=tokenizer).train()
student.save_pretrained(a.output)
tokenizer.save_pretrained(a.output)

print(f"parameters: {report['parameters_before']:,} -> {report['parameters_after']:,}")
print(f"dense perplexity:            {perplexity(teacher, tokenizer, heldout):.2f}")
print(f"pruned perplexity:           {pruned_ppl:.2f}")
print(f"after distillation recovery: {perplexity(student.eval(), tokenizer, heldout):.2f}  (saved to {a.output})")
