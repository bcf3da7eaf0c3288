"""Atomic saving of a compressed model folder (weights, config, tokenizer, generation config, model card)."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path

from transformers.utils import logging

logger = logging.get_logger(__name__)

EVAL_FILE = "hf_compress_eval.json"


def model_card(base: str, method: str, settings: dict, results: dict | None) -> str:
    rows = "\n".join(f"| {k} | {v} |" for k, v in settings.items())
    metrics = "\n".join(f"| {k} | {v:.4g} |" if isinstance(v, float) else f"| {k} | {v} |" for k, v in (results or {}).items())
    return f"""---
library_name: transformers
tags: [hf-compress, quantized, {method}]
base_model: {base}
---
# {Path(str(base)).name} compressed with hf-compress ({method})

```bash
pip install hf-compress
```
```python
import hf_compress  # registers the hf_compress quantization methods with transformers
from transformers import AutoModelForCausalLM
model = AutoModelForCausalLM.from_pretrained("<this folder or repo>")
```

## Settings
| setting | value |
|---|---|
{rows}

## Measured
| metric | value |
|---|---|
{metrics or "| (not measured) | |"}
"""


@contextmanager
def atomic_dir(output_dir):
    """Yield a temporary sibling folder to fill, then swap it in for ``output_dir``: a failure mid-write
    leaves the previous contents of ``output_dir`` intact."""
    out = Path(output_dir).resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        yield tmp
        backup = None
        if out.exists():
            backup = out.parent / f".{out.name}.old-{os.getpid()}"
            os.replace(out, backup)
        try:
            os.replace(tmp, out)
        except BaseException:
            if backup is not None:
                os.replace(backup, out)
            raise
        if backup is not None:
            shutil.rmtree(backup, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def save_compressed(model, output_dir, tokenizer=None, card: str | None = None, results: dict | None = None) -> Path:
    """``save_pretrained`` plus tokenizer, model card and measured results, written atomically (:func:`atomic_dir`)."""
    with atomic_dir(output_dir) as tmp:
        model.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        if card is not None:
            (tmp / "README.md").write_text(card)
        if results is not None:
            (tmp / EVAL_FILE).write_text(json.dumps(results, indent=2, sort_keys=True) + "\n")
    out = Path(output_dir).resolve()
    logger.info(f"saved compressed model to {out}")
    return out
