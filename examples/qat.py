"""Quantization-aware training of pydoc-llama-6m to 2-bit g64, with the float model as teacher, then pack and reload.

    python examples/qat.py [--bits 2] [--group-size 64] [--steps 500] [--output out/qat-int2-g64]   # ~10 min on 2 cores

``prepare_qat`` makes every linear a FakeQuantLinear (the float weight trained through the rounding it will be
stored with, scales and zero points learned too); the DistillationTrainer trains it on pydoc-api-train against the
float model's logits; ``convert_qat`` packs it into the same layers RTN writes, so ``save_pretrained`` and
``from_pretrained`` (after ``import hf_compress``) work as for any quantized model. Scored on pydoc-heldout.
"""

import argparse
import tempfile
from pathlib import Path

from transformers import AutoModelForCausalLM, AutoTokenizer

import hf_compress
from hf_compress.distill import DistillationArguments, DistillationTrainer, text_chunks
from hf_compress.eval import perplexity

SHARED = Path(__file__).resolve().parents[2] / "shared"

p = argparse.ArgumentParser()
p.add_argument("--model", default=str(SHARED / "models" / "pydoc-llama-6m"))
p.add_argument("--bits", type=int, default=2)
p.add_argument("--group-size", type=int, default=64)
p.add_argument("--steps", type=int, default=500)
p.add_argument("--lr", type=float, default=1e-4)
p.add_argument("--output", default="out/qat-int2-g64")
a = p.parse_args()

tokenizer = AutoTokenizer.from_pretrained(a.model)
teacher = AutoModelForCausalLM.from_pretrained(a.model).eval()
config = hf_compress.QATConfig(bits=a.bits, group_size=a.group_size, sym=False)
student = hf_compress.prepare_qat(AutoModelForCausalLM.from_pretrained(a.model), config)
train = text_chunks(tokenizer, SHARED / "data" / "pydoc-api-train.txt", seq_len=256)

with tempfile.TemporaryDirectory() as tmp:
    args = DistillationArguments(
        output_dir=tmp, max_steps=a.steps, per_device_train_batch_size=8, learning_rate=a.lr, weight_decay=0.0,
        lr_scheduler_type="cosine", warmup_steps=max(1, a.steps // 20), alpha=1.0, logging_steps=50, report_to=[],
        save_strategy="no",
    )
    DistillationTrainer(model=student, teacher_model=teacher, args=args, train_dataset=train).train()

hf_compress.convert_qat(student)  # packed QuantLinear layers, config.quantization_config = RTNConfig
student.save_pretrained(a.output)
tokenizer.save_pretrained(a.output)
reloaded = AutoModelForCausalLM.from_pretrained(a.output)
rtn = AutoModelForCausalLM.from_pretrained(a.model, quantization_config=config.target_config())
heldout = SHARED / "data" / "pydoc-heldout.txt"
print(f"float perplexity: {perplexity(teacher, tokenizer, heldout):.2f}")
print(f"RTN int{a.bits} g{a.group_size} perplexity: {perplexity(rtn, tokenizer, heldout):.2f}")
print(f"QAT int{a.bits} g{a.group_size} perplexity (reloaded from {a.output}): {perplexity(reloaded, tokenizer, heldout):.2f}")
