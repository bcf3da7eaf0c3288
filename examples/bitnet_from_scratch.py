"""Train a BitNet b1.58 model from scratch beside a float model of the same shape, data and budget.

    python examples/bitnet_from_scratch.py [--recipe configs/bitnet-scratch.yaml] [--steps 1000]

Both are pydoc-llama-6m-shaped Llamas (6 blocks, hidden 256) with its tokenizer, randomly initialised from the
same seed, trained with cross-entropy on pydoc-api-train.txt + pydoc-calib.txt in 128-token chunks; the b1.58
model's linears are BitLinear layers (ternary absmean weights, int8 activations, straight-through estimators)
from the first step. Prints held-out perplexity of both (the b1.58 one packed).
"""

import argparse
import sys
import tempfile

import torch
from bitnet_convert import SHARED, with_recipe
from datasets import concatenate_datasets
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, Trainer, TrainingArguments

import hf_compress
from hf_compress import BitLinearConfig
from hf_compress.distill import DistillationCollator, text_chunks
from hf_compress.eval import perplexity


def parse(argv=None):
    p = argparse.ArgumentParser()
    p.add_argument("--recipe", default=None)
    p.add_argument("--model", default=str(SHARED / "models" / "pydoc-llama-6m"), help="whose config and tokenizer to use")
    p.add_argument("--steps", type=int, default=1000)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--lr", type=float, default=3e-3, help="float model's learning rate")
    p.add_argument("--bitnet-lr", type=float, default=6e-3, help="b1.58 learning rate (BitNet trains with a larger one)")
    p.add_argument("--seed", type=int, default=0)
    return with_recipe(p, argv)


def train(model, data, tok, a, lr):
    with tempfile.TemporaryDirectory() as out:
        args = TrainingArguments(output_dir=out, max_steps=a.steps, per_device_train_batch_size=a.batch_size, learning_rate=lr,
                                 lr_scheduler_type="cosine", warmup_steps=max(1, a.steps // 20), weight_decay=0.01,
                                 logging_steps=max(1, a.steps // 10), report_to=[], save_strategy="no", seed=a.seed,
                                 data_seed=a.seed, dataloader_pin_memory=False)
        Trainer(model=model, args=args, train_dataset=data, data_collator=DistillationCollator(tok.pad_token_id)).train()
    return model


def main(a):
    tok = AutoTokenizer.from_pretrained(a.model)
    data = concatenate_datasets([text_chunks(tok, SHARED / "data" / "pydoc-api-train.txt", 128),
                                 text_chunks(tok, SHARED / "data" / "pydoc-calib.txt", 128)])
    torch.manual_seed(a.seed)
    init = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(a.model))
    with tempfile.TemporaryDirectory() as d:
        init.save_pretrained(d)
        tok.save_pretrained(d)
        ternary = AutoModelForCausalLM.from_pretrained(d, quantization_config=BitLinearConfig(mode="training"))
    heldout = SHARED / "data" / "pydoc-heldout.txt"
    float_ppl = perplexity(train(init, data, tok, a, a.lr).eval(), tok, heldout, progress=False)
    train(ternary, data, tok, a, a.bitnet_lr)
    hf_compress.pack_bitlinear(ternary)
    result = {"float": float_ppl, "b1.58": perplexity(ternary.eval(), tok, heldout, progress=False),
              "tokens": a.steps * a.batch_size * 128}
    print(result)
    return result


if __name__ == "__main__":
    main(parse(sys.argv[1:]))
