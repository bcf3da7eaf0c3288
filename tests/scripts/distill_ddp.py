"""Run by tests/test_distill_ddp.py under `accelerate launch --cpu --num_processes 2` (gloo), or alone.

One optimizer step of DistillationTrainer on 4 rows of different lengths (CE + soft + hidden loss, widths
16 -> 32 so the projection trains too), SGD; each process writes its parameters to OUT/rank{R}.safetensors."""

import sys
from pathlib import Path

import torch
import transformers as t
from datasets import Dataset
from safetensors.torch import save_file

from hf_compress.distill import DistillationArguments, DistillationTrainer


def llama(hidden, layers, seed):
    cfg = t.LlamaConfig(vocab_size=64, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, pad_token_id=0)
    torch.manual_seed(seed)
    return t.LlamaForCausalLM(cfg).eval()


def main(out: Path, per_device: int) -> None:
    g = torch.Generator().manual_seed(0)
    ids = [torch.randint(3, 64, (n,), generator=g).tolist() for n in (12, 5, 16, 7)]
    data = Dataset.from_dict({"input_ids": ids, "attention_mask": [[1] * len(r) for r in ids]})
    teacher, student = llama(32, 4, 0), llama(16, 2, 1)
    args = DistillationArguments(output_dir=str(out / "run"), per_device_train_batch_size=per_device, max_steps=1,
                                 learning_rate=0.1, optim="sgd", lr_scheduler_type="constant", report_to=[],
                                 save_strategy="no", use_cpu=True, disable_tqdm=True, alpha=0.5, temperature=2.0,
                                 hidden_loss_weight=0.5, logging_steps=1, seed=0)
    trainer = DistillationTrainer(model=student, teacher_model=teacher, args=args, train_dataset=data)
    trainer.train()
    rank = trainer.args.process_index
    state = {k: v.detach().contiguous() for k, v in student.named_parameters()}
    save_file(state, str(out / f"rank{rank}.safetensors"), metadata={"world_size": str(trainer.args.world_size)})


if __name__ == "__main__":
    main(Path(sys.argv[1]), int(sys.argv[2]))
