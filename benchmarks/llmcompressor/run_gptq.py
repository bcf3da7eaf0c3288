#!/usr/bin/env python
"""Run llm-compressor's GPTQ on a local Llama checkpoint and measure perplexity and quantization time.

Runs inside benchmarks/llmcompressor/.venv (see setup.sh); it deliberately does not import hf_compress,
whose dev venv pins a different transformers. Both tools get identical calibration data: the exact
token windows are read from --calib-tokens (a JSON list of n_samples lists of seqlen token ids), and the
evaluation stream from --eval-tokens (a JSON list of token ids).

    HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 \\
    benchmarks/llmcompressor/.venv/bin/python benchmarks/llmcompressor/run_gptq.py \\
        --model ../shared/models/pydoc-llama-6m --calib-tokens calib.json --eval-tokens eval.json \\
        --bits 4 --group-size 128 --sym --out result.json

Timing covers only the ``oneshot`` call (time.perf_counter): that includes llm-compressor's own
overheads (recipe/session setup, tracing the model into per-layer subgraphs, the dataloader), not
just the GPTQ solves.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import resource
import sys
import time
from types import SimpleNamespace

for _var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE"):
    os.environ.setdefault(_var, "1")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="local checkpoint directory (LlamaForCausalLM)")
    p.add_argument("--calib-tokens", required=True, help="JSON list of lists of token ids (n_samples x seqlen)")
    p.add_argument("--eval-tokens", required=True, help="JSON list of token ids (the evaluation stream)")
    p.add_argument("--seqlen-eval", type=int, default=256, help="non-overlapping eval window length (256)")
    p.add_argument("--bits", type=int, default=4)
    p.add_argument("--group-size", type=int, default=128, help="columns per scale; -1 = one scale per output channel")
    p.add_argument("--act-order", action="store_true", help="quantize columns by decreasing Hessian diagonal")
    sym = p.add_mutually_exclusive_group()
    sym.add_argument("--sym", dest="sym", action="store_true", default=True, help="symmetric (default)")
    sym.add_argument("--asym", dest="sym", action="store_false", help="asymmetric (zero point)")
    p.add_argument("--observer", default="minmax", choices=["minmax", "mse"],
                   help="weight range observer: minmax (default) or mse (llm-compressor's grid search: shrink "
                        "1 to 0.8 in steps of 0.01, norm 2.4, patience 5)")
    p.add_argument("--wide-eval-tokens", default=None, help="optional second, longer evaluation stream (JSON)")
    p.add_argument("--damp", type=float, default=0.01, help="dampening as a fraction of the mean Hessian diagonal")
    p.add_argument("--block-size", type=int, default=128, help="GPTQ lazy-batch block size (128)")
    p.add_argument("--batch-size", type=int, default=1, help="calibration batch size for oneshot (1)")
    p.add_argument("--eval-batch-size", type=int, default=8)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: all usable cores)")
    p.add_argument("--out", required=True, help="output JSON file")
    return p.parse_args(argv)


def usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def load_calib(path: str) -> list[list[int]]:
    with open(path) as f:
        windows = json.load(f)
    if not isinstance(windows, list) or not windows or not all(isinstance(w, list) and w for w in windows):
        raise SystemExit(f"{path}: expected a non-empty JSON list of non-empty lists of token ids")
    lengths = {len(w) for w in windows}
    if len(lengths) != 1:
        raise SystemExit(f"{path}: calibration windows must all have the same length, got {sorted(lengths)}")
    return [[int(t) for t in w] for w in windows]


def load_eval(path: str) -> list[int]:
    with open(path) as f:
        ids = json.load(f)
    if not isinstance(ids, list) or not ids or isinstance(ids[0], list):
        raise SystemExit(f"{path}: expected a flat JSON list of token ids")
    return [int(t) for t in ids]


@torch.inference_mode()
def perplexity(model, ids: list[int], seqlen: int, batch_size: int) -> tuple[float, int]:
    """exp(total NLL / total predicted tokens) over non-overlapping windows of ``seqlen`` tokens (the
    incomplete tail is dropped); each window predicts its tokens 1..seqlen-1 from positions 0..seqlen-2."""
    n_windows = len(ids) // seqlen
    if n_windows == 0:
        raise SystemExit(f"eval stream has {len(ids)} tokens, fewer than one window of {seqlen}")
    windows = torch.tensor(ids[: n_windows * seqlen], dtype=torch.long).view(n_windows, seqlen)
    was_training = model.training
    model.eval()
    nll_sum = 0.0
    n_pred = 0
    for start in range(0, n_windows, batch_size):
        batch = windows[start : start + batch_size]
        logits = model(input_ids=batch, use_cache=False).logits
        for row in range(batch.shape[0]):
            nll_sum += F.cross_entropy(logits[row, :-1].float(), batch[row, 1:], reduction="sum").item()
        n_pred += batch.shape[0] * (seqlen - 1)
    model.train(was_training)
    mean_nll = nll_sum / n_pred
    return (math.exp(mean_nll) if math.isfinite(mean_nll) else float("nan")), n_pred


def enable_ragged_groups() -> None:
    """Let group quantization handle an input width that is not a multiple of the group size, with a
    shorter last group (what our GPTQ and AutoGPTQ do).

    llm-compressor 0.14 / compressed-tensors 0.19 size the scales for ceil(columns / group_size) groups
    and GPTQ's own solve maps columns to groups with ``column // group_size`` (fine), but two helpers
    assume exact division: the weight observer (``_flatten_weight``: ``unflatten(-1, (-1, group_size))``)
    and the fake-quant forward (``_process_group`` raises). Both are wrapped to zero-pad the columns to a
    multiple of the group size and drop the padding again. This is exact: ``calculate_qparams`` always
    widens [min, max] to include 0, so zero columns never change a group's scale or zero point, and the
    padded outputs are discarded. Divisible shapes take the original code path unchanged.
    """
    import compressed_tensors.quantization.lifecycle.forward as ct_forward
    import llmcompressor.observers.helpers as obs_helpers
    from compressed_tensors.quantization import QuantizationStrategy

    if getattr(obs_helpers, "_hfc_ragged", False):
        return
    grouped = (QuantizationStrategy.GROUP, QuantizationStrategy.TENSOR_GROUP)

    orig_flatten = obs_helpers._flatten_weight

    def _flatten_weight(value, args):
        if args.strategy in grouped and value.shape[-1] % args.group_size:
            value = F.pad(value, (0, -value.shape[-1] % args.group_size))
        return orig_flatten(value, args)

    orig_process_group = ct_forward._process_group

    def _process_group(x, scale, zero_point, args, *rest):
        columns = x.shape[-1]
        if columns % args.group_size == 0:
            return orig_process_group(x, scale, zero_point, args, *rest)
        padded = F.pad(x, (0, -columns % args.group_size))
        return orig_process_group(padded, scale, zero_point, args, *rest)[..., :columns]

    obs_helpers._flatten_weight = _flatten_weight
    ct_forward._process_group = _process_group
    obs_helpers._hfc_ragged = True


def ragged_layers(model, group_size: int | None) -> list[str]:
    if not group_size or group_size <= 0:
        return []
    return [
        name
        for name, m in model.named_modules()
        if isinstance(m, torch.nn.Linear) and name != "lm_head" and m.in_features % group_size
    ]


@torch.no_grad()
def inspect_quantized(model) -> dict:
    """How the model will run after oneshot, and whether its stored weights are on the quantization grid:
    re-applying the layer's own fake-quant (scale, zero point) to the GPTQ-updated weight should return
    it unchanged (up to float rounding)."""
    from compressed_tensors.quantization.lifecycle.forward import fake_quantize

    n_quant, n_enabled, statuses, max_diff = 0, 0, set(), 0.0
    for _, m in model.named_modules():
        args = getattr(getattr(m, "quantization_scheme", None), "weights", None)
        if args is None or not hasattr(m, "weight_scale"):
            continue
        n_quant += 1
        status = getattr(m, "quantization_status", None)
        statuses.add(str(getattr(status, "value", status)))
        n_enabled += bool(getattr(m, "quantization_enabled", True)) and status is not None
        w = m.weight.data
        requant = fake_quantize(w, m.weight_scale, getattr(m, "weight_zero_point", None), args)
        max_diff = max(max_diff, (requant - w).abs().max().item())
    return {
        "quantized_linears": n_quant,
        "weight_fake_quant_in_forward": n_enabled,
        "quantization_status": sorted(statuses),
        "max_requant_abs_diff": max_diff,
    }


def build_recipe(args: argparse.Namespace):
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme
    from llmcompressor.modifiers.quantization import GPTQModifier

    per_channel = args.group_size is None or args.group_size <= 0
    weights = QuantizationArgs(
        num_bits=args.bits,
        type="int",
        symmetric=args.sym,
        strategy="channel" if per_channel else "group",
        group_size=None if per_channel else args.group_size,
        observer=args.observer,
    )
    # Act-order mapping (GPTQ/AutoGPTQ "desc_act" -> llm-compressor "actorder"):
    #   desc_act=False                     -> actorder=None: columns in natural order.
    #   desc_act=True, static_groups=True  -> actorder="static" (alias of "weight"): columns are
    #       processed by decreasing Hessian diagonal, but each column keeps the scale/zero of its
    #       *original* contiguous group, computed up front from the unmodified weights (no g_idx
    #       reordering at inference).
    #   desc_act=True, static_groups=False -> actorder="group" ("dynamic"): groups formed in the
    #       permuted order, needs a g_idx at inference. REMOVED in compressed-tensors 0.19 /
    #       llmcompressor 0.14 (QuantizationArgs rejects "group"), so --act-order always means "static".
    # Note: in llm-compressor the scales/zeros are ALWAYS taken up front by the min-max weight observer
    # on the original weights (also with actorder=None), i.e. it behaves like static_groups=True; the
    # reference GPTQ without act-order recomputes each group's scale from the error-updated weights
    # when it reaches the group.
    actorder = "static" if args.act_order else None
    scheme = QuantizationScheme(targets=["Linear"], weights=weights)
    return GPTQModifier(
        config_groups={"group_0": scheme},
        ignore=["lm_head"],
        actorder=actorder,  # explicit None overrides the modifier's default "static"
        block_size=args.block_size,
        dampening_frac=args.damp,
        # pydoc-llama-6m's down_proj has 704 input columns (not a multiple of 128): the last group is
        # shorter (64 columns), as in our GPTQ, instead of refusing / skipping those layers; needs
        # enable_ragged_groups() (the check only guards llm-compressor's own helpers).
        bypass_divisibility_checks=True,
    )


def start_run(args) -> SimpleNamespace:
    """What every runner starts with: torch threads and seed; llm-compressor's imports (it adds its loguru console
    sink on import, bound to whatever sys.stdout is then, so stdout is pointed at stderr meanwhile and carries only
    the result JSON); the calibration windows and evaluation stream; the fp32 model, checked against its positions."""
    threads = args.threads or usable_cores()
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    with contextlib.redirect_stdout(sys.stderr):
        import compressed_tensors
        import datasets
        import llmcompressor
        import transformers
        from llmcompressor import oneshot
        from transformers import AutoModelForCausalLM

    calib = load_calib(args.calib_tokens)
    eval_ids = load_eval(args.eval_tokens)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32, device_map="cpu")
    model.eval()
    max_pos = getattr(model.config, "max_position_embeddings", None)
    for name, length in (("calibration seqlen", len(calib[0])), ("--seqlen-eval", args.seqlen_eval)):
        if max_pos is not None and length > max_pos:
            raise SystemExit(f"{name}={length} exceeds the model's {max_pos} positions")
    versions = {"torch": torch.__version__, "transformers": transformers.__version__,
                "llmcompressor": llmcompressor.__version__, "compressed_tensors": compressed_tensors.__version__}
    return SimpleNamespace(threads=threads, oneshot=oneshot, datasets=datasets, versions=versions, model=model,
                           calib=calib, eval_ids=eval_ids, n_samples=len(calib), seqlen=len(calib[0]))


def main(argv=None) -> int:
    args = parse_args(argv)
    run = start_run(args)
    threads, oneshot, datasets, model = run.threads, run.oneshot, run.datasets, run.model
    calib, eval_ids, n_samples, seqlen = run.calib, run.eval_ids, run.n_samples, run.seqlen

    t0 = time.perf_counter()
    ppl_fp32, n_pred = perplexity(model, eval_ids, args.seqlen_eval, args.eval_batch_size)
    print(
        f"fp32 perplexity {ppl_fp32:.4f} over {n_pred} predicted tokens ({time.perf_counter() - t0:.1f}s)",
        file=sys.stderr,
    )

    ragged = ragged_layers(model, args.group_size)
    if ragged:
        print(
            f"{len(ragged)} layers have a width not divisible by group_size={args.group_size} "
            f"(e.g. {ragged[0]}): last group shorter (ragged-group shim)",
            file=sys.stderr,
        )
        enable_ragged_groups()

    ds = datasets.Dataset.from_dict({"input_ids": calib, "attention_mask": [[1] * seqlen for _ in calib]})
    recipe = build_recipe(args)

    torch.manual_seed(0)
    load_before_quant = os.getloadavg()[0]
    t0 = time.perf_counter()
    model = oneshot(
        model=model,
        dataset=ds,
        recipe=recipe,
        num_calibration_samples=n_samples,
        # no shuffling: LengthAwareSampler yields every window exactly once (its order comes from a
        # length sort, a tie here; the Hessians are sums, so the order only affects float rounding)
        shuffle_calibration_samples=False,
        max_seq_length=seqlen,
        batch_size=args.batch_size,
        pipeline="sequential",  # one decoder layer at a time, errors propagated (its default for GPTQ)
    )
    quant_seconds = time.perf_counter() - t0
    print(f"oneshot took {quant_seconds:.2f}s", file=sys.stderr)

    model.eval()
    load_after_quant = os.getloadavg()[0]
    quant_state = inspect_quantized(model)
    print(f"after oneshot: {quant_state}", file=sys.stderr)
    t0 = time.perf_counter()
    ppl_quant, _ = perplexity(model, eval_ids, args.seqlen_eval, args.eval_batch_size)
    print(f"quantized perplexity {ppl_quant:.4f} ({time.perf_counter() - t0:.1f}s)", file=sys.stderr)
    ppl_wide = None
    if args.wide_eval_tokens:
        ppl_wide, _ = perplexity(model, load_eval(args.wide_eval_tokens), args.seqlen_eval, args.eval_batch_size)

    result = {
        "llmcompressor_version": run.versions["llmcompressor"],
        "compressed_tensors_version": run.versions["compressed_tensors"],
        "transformers_version": run.versions["transformers"],
        "torch_version": torch.__version__,
        "bits": args.bits,
        "group_size": args.group_size if args.group_size and args.group_size > 0 else -1,
        "act_order": args.act_order,
        "actorder_llmcompressor": "static" if args.act_order else None,
        "sym": args.sym,
        "damp": args.damp,
        "block_size": args.block_size,
        "ragged_group_layers": len(ragged),
        "n_samples": n_samples,
        "seqlen": seqlen,
        "seqlen_eval": args.seqlen_eval,
        "eval_tokens": len(eval_ids),
        "eval_predicted_tokens": n_pred,
        "threads": threads,
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
        "quant_seconds": quant_seconds,
        "ppl_fp32": ppl_fp32,
        "ppl_quant": ppl_quant,
        "ppl_ratio": ppl_quant / ppl_fp32,
        "observer": args.observer,
        "ppl_quant_wide": ppl_wide,
        **quant_state,
        # 1-minute load average just before/after oneshot: on a shared machine a value above the thread
        # count means quant_seconds was inflated by other processes.
        "loadavg_before_quant": load_before_quant,
        "loadavg_after_quant": load_after_quant,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0,  # Linux: KiB
    }
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)
        f.write("\n")
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
