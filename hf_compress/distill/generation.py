"""Sequence-level and instruction distillation: a dataset of the teacher's own generations, for training the
student with the same trainer (Kim & Rush's sequence-level KD; instruction, chain-of-thought and in-context
prompting for instruction-following students)."""

from __future__ import annotations

import torch
from tqdm.auto import tqdm
from transformers.utils import logging

from ..eval._utils import eval_mode, model_device

logger = logging.get_logger(__name__)

__all__ = ["TEMPLATES", "format_prompt", "generate_distillation_dataset", "tokenize_generations"]

TEMPLATES = {
    "plain": "{prompt}",
    "instruction": "### Instruction:\n{prompt}\n\n### Response:\n",
    "chain-of-thought": "### Instruction:\n{prompt}\n\n### Response:\nLet's think step by step.\n",
    "in-context": "{examples}### Input:\n{prompt}\n\n### Output:\n",
}
EXAMPLE_TEMPLATE = "### Input:\n{input}\n\n### Output:\n{output}\n\n"


def format_prompt(prompt: str, template: str = "plain", examples: list | None = None) -> str:
    """``prompt`` in a template: a name of :data:`TEMPLATES` or a format string with ``{prompt}`` (and
    optionally ``{examples}``). ``examples``: ``(input, output)`` pairs for the in-context template."""
    fmt = TEMPLATES.get(template, template)
    if "{prompt}" not in fmt:
        raise ValueError(f"template must be one of {sorted(TEMPLATES)} or a format string containing '{{prompt}}', got {template!r}")
    if "{examples}" in fmt and not examples:
        raise ValueError("the in-context template needs examples=[(input, output), ...]")
    shots = "".join(EXAMPLE_TEMPLATE.format(input=i, output=o) for i, o in (examples or []))
    return fmt.format(prompt=prompt, examples=shots)


@torch.no_grad()
def generate_distillation_dataset(
    teacher,
    tokenizer,
    prompts: list[str],
    *,
    template: str = "plain",
    examples: list | None = None,
    max_new_tokens: int = 128,
    batch_size: int = 8,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_p: float = 1.0,
    seed: int = 0,
):
    """A ``datasets.Dataset`` of the teacher's generations with columns ``prompt`` (the formatted prompt),
    ``completion`` (what the teacher wrote) and ``text`` (both). Batched (left padding), with a progress bar;
    greedy by default, seeded when sampling."""
    from datasets import Dataset

    if not prompts:
        raise ValueError("no prompts: pass a non-empty list of strings")
    if max_new_tokens < 1 or batch_size < 1:
        raise ValueError(f"max_new_tokens and batch_size must be positive, got {max_new_tokens} and {batch_size}")
    formatted = [format_prompt(p, template, examples) for p in prompts]
    device = model_device(teacher)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    completions = []
    try:
        with eval_mode(teacher), torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            torch.manual_seed(seed)
            for start in tqdm(range(0, len(formatted), batch_size), desc="teacher generations", unit="batch"):
                chunk = formatted[start : start + batch_size]
                enc = tokenizer(chunk, return_tensors="pt", padding=True).to(device)
                kw = {"do_sample": do_sample, "max_new_tokens": max_new_tokens, "pad_token_id": pad}
                if do_sample:
                    kw.update(temperature=temperature, top_p=top_p, top_k=0)
                out = teacher.generate(**enc, **kw)
                completions += tokenizer.batch_decode(out[:, enc["input_ids"].shape[1] :], skip_special_tokens=True)
    finally:
        tokenizer.padding_side = side
    return Dataset.from_dict({"prompt": formatted, "completion": completions, "text": [p + c for p, c in zip(formatted, completions, strict=True)]})


def tokenize_generations(dataset, tokenizer, *, max_length: int = 512, mask_prompt: bool = True):
    """``input_ids``/``attention_mask``/``labels`` rows for training on a generated dataset; with
    ``mask_prompt`` the prompt's tokens are −100 in ``labels`` (the student learns the completions)."""

    def encode(row):
        prompt_ids = tokenizer(row["prompt"])["input_ids"]
        ids = tokenizer(row["text"])["input_ids"][:max_length]
        labels = list(ids)
        if mask_prompt:
            n = min(len(prompt_ids), len(ids))
            labels[:n] = [-100] * n
        return {"input_ids": ids, "attention_mask": [1] * len(ids), "labels": labels}

    return dataset.map(encode, remove_columns=dataset.column_names)
