#!/usr/bin/env python
"""Run llm-compressor's pruning (SparseGPT or Wanda) on a local Llama checkpoint; measure perplexity and time.

Runs inside benchmarks/llmcompressor/.venv (see setup.sh); like run_gptq.py it never imports hf_compress.
Same inputs as run_gptq.py: the exact calibration windows from --calib-tokens (a JSON list of n_samples
lists of seqlen token ids) and the evaluation stream from --eval-tokens (a flat JSON list of token ids);
perplexity is run_gptq.py's own function (non-overlapping --seqlen-eval windows, incomplete tail dropped).

    HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 \\
    benchmarks/llmcompressor/.venv/bin/python benchmarks/llmcompressor/run_prune.py \\
        --model ../shared/models/pydoc-llama-6m --calib-tokens calib.json --eval-tokens eval.json \\
        --method sparsegpt --sparsity 0.5 --mask-structure 2:4 --out result.json

Every Linear inside the decoder layers (q/k/v/o/gate/up/down of each LlamaDecoderLayer) is pruned at the
same sparsity (no OWL layer-wise schedule); embeddings and lm_head stay dense. Timing covers only the
``oneshot`` call (time.perf_counter), i.e. including llm-compressor's session setup, tracing and data
loading. After pruning the fraction of zero weights is measured (``measured_sparsity``) and checked
against the request; the script exits with status 1 (after writing the JSON) if it does not match.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time

for _var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE"):
    os.environ.setdefault(_var, "1")

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402

# Shared with the GPTQ runner so that both report perplexity by exactly the same code.
from run_gptq import perplexity, start_run  # noqa: E402

# |measured - requested| allowed per pruned Linear. llm-compressor's SparseGPT (unstructured) prunes
# floor(rows * block_cols * s) + 1 weights per block of columns (threshold test is `<=`), a hair above s.
SPARSITY_TOLERANCE = 1e-3


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="local checkpoint directory (LlamaForCausalLM)")
    p.add_argument("--calib-tokens", required=True, help="JSON list of lists of token ids (n_samples x seqlen)")
    p.add_argument("--eval-tokens", required=True, help="JSON list of token ids (the evaluation stream)")
    p.add_argument("--seqlen-eval", type=int, default=256, help="non-overlapping eval window length (256)")
    p.add_argument("--method", required=True, choices=("sparsegpt", "wanda"))
    p.add_argument("--sparsity", type=float, default=0.5, help="fraction of weights removed per Linear (0.5)")
    p.add_argument(
        "--mask-structure",
        default="0:0",
        help='"0:0" = unstructured (default), or "N:M" in llm-compressor\'s convention: N weights *pruned* '
        "in every M consecutive input columns (2:4 -> 50%%); --sparsity must then equal N/M",
    )
    p.add_argument("--block-size", type=int, default=128, help="sparsegpt: columns per lazy-update block (128)")
    p.add_argument("--damp", type=float, default=0.01, help="sparsegpt: dampening_frac, fraction of mean diag(H)")
    p.add_argument("--batch-size", type=int, default=1, help="calibration batch size for oneshot (1)")
    p.add_argument("--eval-batch-size", type=int, default=8)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: all usable cores)")
    p.add_argument("--out", required=True, help="output JSON file")
    args = p.parse_args(argv)

    try:
        n, m = (int(x) for x in args.mask_structure.split(":"))
    except ValueError:
        p.error(f"--mask-structure must look like N:M, got {args.mask_structure!r}")
    if (n, m) == (0, 0):
        if not 0.0 < args.sparsity < 1.0:
            p.error("--sparsity must be in (0, 1)")
    else:
        if not 0 < n < m:
            p.error(f"--mask-structure {args.mask_structure}: need 0 < N < M")
        # llm-compressor ignores `sparsity` for N:M masks (exactly N of every M are pruned); refuse a
        # request it would silently not honour.
        if abs(args.sparsity - n / m) > 1e-9:
            p.error(
                f"--mask-structure {n}:{m} prunes {n}/{m} = {n / m:g} of the weights; got --sparsity {args.sparsity}"
            )
    args.prune_n, args.prune_m = n, m
    return args


def decoder_linears(model, layer_cls: str) -> dict[str, torch.nn.Linear]:
    """Every nn.Linear inside a module of class ``layer_cls`` (the pruning targets)."""
    out = {}
    for name, module in model.named_modules():
        if type(module).__name__ == layer_cls:
            for sub, m in module.named_modules():
                if isinstance(m, torch.nn.Linear):
                    out[f"{name}.{sub}"] = m
    return out


@torch.no_grad()
def sparsity_report(model, layer_cls: str, prune_n: int, prune_m: int) -> dict:
    linears = decoder_linears(model, layer_cls)
    zeros = total = 0
    per = {}
    nm_ok = nm_groups = 0
    for name, m in linears.items():
        w = m.weight.detach()
        z = int((w == 0).sum())
        zeros += z
        total += w.numel()
        per[name] = z / w.numel()
        if prune_m and w.shape[1] % prune_m == 0:
            groups = (w == 0).reshape(w.shape[0], -1, prune_m).sum(-1)
            nm_ok += int((groups >= prune_n).sum())
            nm_groups += groups.numel()
    head = model.get_output_embeddings()
    head_zeros = float((head.weight == 0).float().mean()) if head is not None else None
    return {
        "measured_sparsity": zeros / total if total else float("nan"),
        "measured_sparsity_min": min(per.values()) if per else None,
        "measured_sparsity_max": max(per.values()) if per else None,
        "pruned_linears": sum(v > 0 for v in per.values()),
        "decoder_linears": len(per),
        "decoder_linear_params": total,
        # fraction of M-column groups (per row) holding >= N zeros; 1.0 = valid N:M pattern
        "nm_groups_ok": (nm_ok / nm_groups if nm_groups else None) if prune_m else None,
        "lm_head_zero_fraction": head_zeros,
        "_per_linear": per,
    }


def build_recipe(args: argparse.Namespace, layer_cls: str):
    from llmcompressor.modifiers.pruning import SparseGPTModifier, WandaPruningModifier

    common = dict(
        sparsity=args.sparsity,  # one float: the same sparsity for every targeted layer
        sparsity_profile=None,  # no OWL (outlier-weighted layer-wise sparsities); needs owl_m/owl_lmbda anyway
        mask_structure=args.mask_structure,
        # In llm-compressor's pruning modifiers `targets` names the *containers*: every Linear/Conv inside
        # a matching module is pruned (the Linears of each decoder layer here). The default ["Linear"]
        # would also prune lm_head; it is outside the decoder layers, the ignore is belt and braces.
        targets=[layer_cls],
        ignore=["re:.*lm_head"],
    )
    if args.method == "sparsegpt":
        modifier = SparseGPTModifier(
            **common,
            block_size=args.block_size,
            dampening_frac=args.damp,
            preserve_sparsity_mask=False,
            offload_hessians=False,
        )
    else:
        modifier = WandaPruningModifier(**common)
    return modifier


def modifier_args(modifier) -> dict:
    keys = ["sparsity", "sparsity_profile", "mask_structure", "owl_m", "owl_lmbda", "targets", "ignore"]
    keys += [
        k
        for k in ("block_size", "dampening_frac", "preserve_sparsity_mask", "offload_hessians")
        if hasattr(modifier, k)
    ]
    return {"class": type(modifier).__name__, **{k: getattr(modifier, k) for k in keys}}


def main(argv=None) -> int:
    args = parse_args(argv)
    run = start_run(args)
    threads, oneshot, datasets, model = run.threads, run.oneshot, run.datasets, run.model
    calib, eval_ids, n_samples, seqlen = run.calib, run.eval_ids, run.n_samples, run.seqlen
    layer_cls = type(model.model.layers[0]).__name__  # LlamaDecoderLayer
    if layer_cls not in (getattr(model, "_no_split_modules", None) or [layer_cls]):
        raise SystemExit(f"{layer_cls} is not in the model's _no_split_modules {model._no_split_modules}")

    if args.prune_m:
        bad = [n for n, m in decoder_linears(model, layer_cls).items() if m.in_features % args.prune_m]
        if bad:
            raise SystemExit(f"{len(bad)} Linears (e.g. {bad[0]}) have in_features not divisible by M={args.prune_m}")
    dense_state = sparsity_report(model, layer_cls, args.prune_n, args.prune_m)
    head_before = model.get_output_embeddings().weight.detach().clone()

    t0 = time.perf_counter()
    ppl_dense, n_pred = perplexity(model, eval_ids, args.seqlen_eval, args.eval_batch_size)
    print(
        f"dense perplexity {ppl_dense:.4f} over {n_pred} predicted tokens ({time.perf_counter() - t0:.1f}s)",
        file=sys.stderr,
    )

    ds = datasets.Dataset.from_dict({"input_ids": calib, "attention_mask": [[1] * seqlen for _ in calib]})
    recipe = build_recipe(args, layer_cls)
    recipe_args = modifier_args(recipe)
    print(f"recipe: {recipe_args}", file=sys.stderr)

    torch.manual_seed(0)
    load_before = os.getloadavg()[0]
    t0 = time.perf_counter()
    model = oneshot(
        model=model,
        dataset=ds,
        recipe=recipe,
        num_calibration_samples=n_samples,
        shuffle_calibration_samples=False,  # every window exactly once
        max_seq_length=seqlen,
        batch_size=args.batch_size,
        # one decoder layer at a time: calibrate on its inputs, prune all its Linears, then re-run the
        # pruned layer to produce the next layer's inputs (propagate_error=True, the default)
        pipeline="sequential",
        sequential_targets=[layer_cls],
    )
    prune_seconds = time.perf_counter() - t0
    load_after = os.getloadavg()[0]
    print(f"oneshot took {prune_seconds:.2f}s", file=sys.stderr)

    model.eval()
    state = sparsity_report(model, layer_cls, args.prune_n, args.prune_m)
    per_linear = state.pop("_per_linear")
    head_unchanged = bool(torch.equal(model.get_output_embeddings().weight.detach(), head_before))
    off = {n: s for n, s in per_linear.items() if abs(s - args.sparsity) > SPARSITY_TOLERANCE}
    sparsity_ok = not off and state["pruned_linears"] == state["decoder_linears"] and head_unchanged
    if args.prune_m:
        sparsity_ok = sparsity_ok and state["nm_groups_ok"] == 1.0
    print(
        f"measured sparsity {state['measured_sparsity']:.6f} (per Linear {state['measured_sparsity_min']:.6f}"
        f"..{state['measured_sparsity_max']:.6f}, {state['pruned_linears']}/{state['decoder_linears']} pruned, "
        f"lm_head unchanged: {head_unchanged})",
        file=sys.stderr,
    )

    t0 = time.perf_counter()
    ppl, _ = perplexity(model, eval_ids, args.seqlen_eval, args.eval_batch_size)
    print(f"pruned perplexity {ppl:.4f} ({time.perf_counter() - t0:.1f}s)", file=sys.stderr)

    result = {
        "method": args.method,
        "sparsity": args.sparsity,
        "mask_structure": args.mask_structure,
        "ppl": ppl,
        "prune_seconds": prune_seconds,
        "measured_sparsity": state["measured_sparsity"],
        "versions": run.versions,
        "sparsity_ok": sparsity_ok,
        **{k: v for k, v in state.items() if k != "measured_sparsity"},
        "dense_sparsity": dense_state["measured_sparsity"],
        "lm_head_unchanged": head_unchanged,
        "ppl_dense": ppl_dense,
        "ppl_ratio": ppl / ppl_dense,
        "block_size": args.block_size if args.method == "sparsegpt" else None,
        "damp": args.damp if args.method == "sparsegpt" else None,
        "modifier": recipe_args,
        "layer_class": layer_cls,
        "n_samples": n_samples,
        "seqlen": seqlen,
        "batch_size": args.batch_size,
        "seqlen_eval": args.seqlen_eval,
        "eval_tokens": len(eval_ids),
        "eval_predicted_tokens": n_pred,
        "threads": threads,
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
        # 1-minute load average just before/after oneshot: above the thread count = contended timing
        "loadavg_before_prune": load_before,
        "loadavg_after_prune": load_after,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0,  # Linux: KiB
        "sparsity_per_linear": per_linear,
    }
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)
        f.write("\n")
    print(json.dumps(result, indent=2))
    if not sparsity_ok:
        print(
            f"ERROR: pruned weights do not match the request (sparsity {args.sparsity}, {args.mask_structure}); "
            f"off by more than {SPARSITY_TOLERANCE}: {sorted(off)[:5]}",
            file=sys.stderr,
        )
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
