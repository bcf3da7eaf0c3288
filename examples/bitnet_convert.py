"""Convert pydoc-llama-6m to BitNet b1.58 (or 1-bit BitNet, or OneBit) by continued training with the float
model as teacher (DistillationTrainer) and a quantization-strength warm-up, then pack and save it.

    python examples/bitnet_convert.py [--method bitnet|onebit] [--bits 1.58|1] [--steps 2000] [--output out/b158]

Training data: ../shared/data/pydoc-api-train.txt and pydoc-calib.txt in 128-token chunks (never the held-out
text); the token budget is steps x batch x 128. Prints held-out perplexity before (weights quantized, no
training) and after, beside the float model's.
"""

import argparse
import sys
import tempfile
from pathlib import Path

from datasets import concatenate_datasets
from transformers import AutoModelForCausalLM, AutoTokenizer

import hf_compress
from hf_compress import BitLinearConfig, BitLinearWarmup, OneBitConfig
from hf_compress.distill import DistillationArguments, DistillationTrainer, text_chunks
from hf_compress.eval import perplexity

SHARED = Path(__file__).resolve().parents[2] / "shared"


def parse(argv=None):
    p = argparse.ArgumentParser()
    p.add_argument("--recipe", default=None, help="YAML of these flags' values (configs/bitnet-*.yaml); flags override it")
    p.add_argument("--model", default=str(SHARED / "models" / "pydoc-llama-6m"))
    p.add_argument("--method", default="bitnet", choices=["bitnet", "onebit"])
    p.add_argument("--bits", type=float, default=1.58)
    p.add_argument("--steps", type=int, default=2000)
    p.add_argument("--warmup", type=int, default=None, help="λ warm-up steps (default: 10%% of --steps; bitnet only)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--alpha", type=float, default=1.0, help="soft-loss weight (1: pure distillation)")
    p.add_argument("--hidden-weight", type=float, default=0.0, help="hidden-state MSE weight (OneBit's loss adds it)")
    p.add_argument("--layernorm", action="store_true", help="onebit: with the paper's output LayerNorm")
    p.add_argument("--output", default=None)
    p.add_argument("--seed", type=int, default=0)
    return with_recipe(p, argv)


def with_recipe(p, argv):
    """Parse ``argv`` with the recipe's values as defaults (unknown recipe keys are an error)."""
    first, _ = p.parse_known_args(argv)
    if first.recipe:
        import yaml

        values = yaml.safe_load(Path(first.recipe).read_text()) or {}
        known = {a.dest for a in p._actions}
        unknown = sorted(set(values) - known)
        if unknown:
            raise SystemExit(f"recipe {first.recipe}: unknown keys {unknown}")
        p.set_defaults(**values)
    return p.parse_args(argv)


def convert(a, log=print):
    tok = AutoTokenizer.from_pretrained(a.model)
    teacher = AutoModelForCausalLM.from_pretrained(a.model).eval()
    warm = a.warmup if a.warmup is not None else a.steps // 10
    if a.method == "bitnet":
        bits = 1.58 if a.bits == 1.58 else int(a.bits)
        cfg = BitLinearConfig(bits=bits, mode="training", warmup_steps=warm)
    else:
        cfg, warm = OneBitConfig(mode="training", layernorm=a.layernorm), 0
    student = AutoModelForCausalLM.from_pretrained(a.model, quantization_config=cfg)
    heldout = SHARED / "data" / "pydoc-heldout.txt"
    hf_compress.set_quantization_strength(student, 1.0)
    before = perplexity(student.eval(), tok, heldout, progress=False)
    hf_compress.set_quantization_strength(student, 0.0 if warm else 1.0)
    train = concatenate_datasets([text_chunks(tok, SHARED / "data" / "pydoc-api-train.txt", 128),
                                  text_chunks(tok, SHARED / "data" / "pydoc-calib.txt", 128)])
    args = DistillationArguments(
        output_dir=a.output or tempfile.mkdtemp(prefix="hfc-convert-"), max_steps=a.steps, per_device_train_batch_size=a.batch_size,
        learning_rate=a.lr, lr_scheduler_type="cosine", warmup_steps=max(1, a.steps // 20), weight_decay=0.0,
        alpha=a.alpha, temperature=1.0, hidden_loss_weight=a.hidden_weight, logging_steps=max(1, a.steps // 10),
        report_to=[], save_strategy="no", seed=a.seed, data_seed=a.seed, dataloader_pin_memory=False,
    )
    trainer = DistillationTrainer(model=student, teacher_model=teacher, args=args, train_dataset=train,
                                  processing_class=tok, callbacks=[BitLinearWarmup(warm)] if warm else [])
    trainer.train()
    hf_compress.set_quantization_strength(student, 1.0)
    hf_compress.pack_bitlinear(student)
    after = perplexity(student.eval(), tok, heldout, progress=False)
    result = {"float": perplexity(teacher, tok, heldout, progress=False), "quantized, no training": before,
              "converted": after, "tokens": a.steps * a.batch_size * 128, "steps": a.steps}
    if a.output:
        student.save_pretrained(a.output)
        tok.save_pretrained(a.output)
    log(result)
    return student, result


if __name__ == "__main__":
    convert(parse(sys.argv[1:]))
