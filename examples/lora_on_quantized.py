"""LoRA on a packed 2-bit pydoc-llama-6m (quantization-aware fine-tuning), adapted to pydoc's API pages.

    python examples/lora_on_quantized.py [--bits 2] [--group-size 64] [--steps 300] [--output out/lora-int2]  # ~4 min

The base stays packed while LoRA trains beside it (gradients flow through the packed layer's backward); the
adapter saves on its own and reloads with PEFT's ``PeftModel.from_pretrained`` once hf_compress is imported.
Scored on pydoc-api-eval (modules the training file does not contain).
"""

import argparse
from pathlib import Path

from peft import PeftModel, get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer, Trainer, TrainingArguments

import hf_compress
from hf_compress.distill import DistillationCollator, text_chunks
from hf_compress.eval import perplexity

SHARED = Path(__file__).resolve().parents[2] / "shared"

p = argparse.ArgumentParser()
p.add_argument("--model", default=str(SHARED / "models" / "pydoc-llama-6m"))
p.add_argument("--bits", type=int, default=2)
p.add_argument("--group-size", type=int, default=64)
p.add_argument("--steps", type=int, default=300)
p.add_argument("--output", default="out/lora-int2")
a = p.parse_args()

tokenizer = AutoTokenizer.from_pretrained(a.model)
quant = hf_compress.RTNConfig(bits=a.bits, group_size=a.group_size, sym=False)
base = AutoModelForCausalLM.from_pretrained(a.model, quantization_config=quant)
evaluation = SHARED / "data" / "pydoc-api-eval.txt"
print(f"un-tuned int{a.bits} base perplexity: {perplexity(base, tokenizer, evaluation):.2f}")

model = get_peft_model(base, hf_compress.lora_config(base, r=16, lora_alpha=32, target_modules="all-linear"))
args = TrainingArguments(output_dir=a.output, max_steps=a.steps, per_device_train_batch_size=8, learning_rate=1e-3,
                         lr_scheduler_type="cosine", warmup_steps=15, logging_steps=50, report_to=[], save_strategy="no")
train = text_chunks(tokenizer, SHARED / "data" / "pydoc-api-train.txt", seq_len=256)
Trainer(model=model, args=args, train_dataset=train, data_collator=DistillationCollator(pad_token_id=0)).train()
model.save_pretrained(a.output)  # adapter_config.json + adapter_model.safetensors only

fresh = AutoModelForCausalLM.from_pretrained(a.model, quantization_config=quant)
tuned = PeftModel.from_pretrained(fresh, a.output)
print(f"LoRA on the int{a.bits} base perplexity (adapter reloaded): {perplexity(tuned.eval(), tokenizer, evaluation):.2f}")
merged = tuned.merge_and_unload()  # requantized onto the base's grid: see hf_compress.merge_report(merged)
kept = [r["update_kept"] for r in hf_compress.merge_report(merged).values()]
print(f"merged into int{a.bits}: {sum(kept) / len(kept):.1%} of the update kept on average, perplexity "
      f"{perplexity(merged, tokenizer, evaluation):.2f}")
