#!/usr/bin/env python
"""Write the calibration / evaluation token files that run_gptq.py reads (smoke-test helper).

The GPTQ benchmark proper produces these files on our side so that both tools see identical windows;
this script exists so that the llm-compressor runner can be exercised on its own. It uses only the
model's tokenizer (no hf_compress):

- calibration: the calibration text tokenized whole (``tokenizer(text)["input_ids"]``), then
  ``--n-samples`` windows of ``--seqlen`` tokens at uniformly random start offsets
  (``torch.Generator().manual_seed(--seed)``) -> JSON list of lists;
- evaluation: the held-out text tokenized whole, first ``--eval-max-tokens`` tokens -> JSON list.

Never calibrate on the held-out file.
"""

from __future__ import annotations

import argparse
import json
import os

for _var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE"):
    os.environ.setdefault(_var, "1")

import torch  # noqa: E402
from transformers import AutoTokenizer  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="checkpoint directory holding the tokenizer")
    p.add_argument("--calib-text", required=True)
    p.add_argument("--eval-text", required=True)
    p.add_argument("--n-samples", type=int, default=128)
    p.add_argument("--seqlen", type=int, default=256)
    p.add_argument("--eval-max-tokens", type=int, default=20000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--calib-out", required=True)
    p.add_argument("--eval-out", required=True)
    args = p.parse_args(argv)

    if os.path.realpath(args.calib_text) == os.path.realpath(args.eval_text):
        raise SystemExit("refusing to calibrate on the evaluation text")

    tok = AutoTokenizer.from_pretrained(args.model)
    with open(args.calib_text, encoding="utf-8") as f:
        calib_ids = tok(f.read(), verbose=False)["input_ids"]
    with open(args.eval_text, encoding="utf-8") as f:
        eval_ids = tok(f.read(), verbose=False)["input_ids"][: args.eval_max_tokens]

    if len(calib_ids) < args.seqlen:
        raise SystemExit(f"calibration text has {len(calib_ids)} tokens, fewer than seqlen={args.seqlen}")
    gen = torch.Generator().manual_seed(args.seed)
    starts = torch.randint(0, len(calib_ids) - args.seqlen + 1, (args.n_samples,), generator=gen).tolist()
    windows = [calib_ids[s : s + args.seqlen] for s in starts]

    for path, payload in ((args.calib_out, windows), (args.eval_out, eval_ids)):
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        with open(path, "w") as f:
            json.dump(payload, f)
    print(f"calibration: {len(windows)} x {args.seqlen} tokens from {len(calib_ids)} -> {args.calib_out}")
    print(f"evaluation: {len(eval_ids)} tokens -> {args.eval_out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
