"""The ``hf-compress`` command line: quantize, prune, lowrank, export, distill, eval, compare, demo."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from transformers.utils import logging

logger = logging.get_logger("hf_compress.cli")

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED = REPO_ROOT.parent / "shared"
DEFAULT_MODEL = SHARED / "models" / "pydoc-llama-6m"
DEFAULT_TEXT = SHARED / "data" / "pydoc-heldout.txt"


# -- building a config from flags and recipes --------------------------------------------------------------
def method_configs() -> dict:
    from .integrations import BitLinearConfig, GPTQConfig, Int8MixedConfig, OneBitConfig, RTNConfig, W8A8Config

    return {"rtn": RTNConfig, "gptq": GPTQConfig, "llm-int8": Int8MixedConfig, "w8a8": W8A8Config,
            "bitnet": BitLinearConfig, "onebit": OneBitConfig}


def bits_arg(v: str):
    """``--bits``: an integer, or 1.58 (ternary, ``--method bitnet``)."""
    try:
        f = float(v)
    except ValueError:
        raise argparse.ArgumentTypeError(f"bits must be a number (2, 3, 4, 8; 1.58 or 1 for bitnet), got {v!r}") from None
    return int(f) if f.is_integer() else f


def load_recipe(path: str | None) -> dict:
    if path is None:
        return {}
    import yaml

    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"recipe not found: {path}")
    data = yaml.safe_load(p.read_text()) or {}
    if not isinstance(data, dict):
        raise ValueError(f"recipe {path} must be a YAML mapping of config fields, got {type(data).__name__}")
    return data


def build_config(args) -> tuple[str, object]:
    recipe = load_recipe(args.recipe)
    method = args.method or recipe.pop("method", None) or "rtn"
    recipe.pop("method", None)
    configs = method_configs()
    if method not in configs:
        raise ValueError(f"unknown method {method!r}; choose one of {sorted(configs)}")
    fields = dict(recipe)
    flags = {
        "bits": "bits",
        "group_size": "group_size",
        "sym": "sym",
        "act_order": "desc_act",
        "n_samples": "n_samples",
        "seqlen": "seqlen",
        "seed": "seed",
        "threshold": "threshold",
        "mode": "mode",
        "act_granularity": "act_granularity",
        "observer": "observer",
        "smooth": "smooth_alpha",
    }
    for flag, field in flags.items():
        value = getattr(args, flag, None)
        if value is not None:
            fields[field] = value
    if args.skip:
        fields["modules_to_not_convert"] = args.skip
    config_cls = configs[method]
    calib = getattr(args, "calib", None) or fields.pop("calib", None)
    unknown = sorted(set(fields) - set(config_cls.fields) - set(config_cls.runtime_fields))
    if unknown:
        flagged = sorted(f"--{k.replace('_', '-')}" for k, v in flags.items() if v in unknown)
        raise ValueError(f"--method {method} does not take {flagged or unknown}")
    if calib is not None and "dataset" in config_cls.runtime_fields:
        fields["dataset"] = str(calib)
    config = config_cls(**fields)
    calibrates = "dataset" in config_cls.runtime_fields and getattr(config, "needs_calibration", True)
    if calibrates and calib is None:
        raise ValueError(f"--method {method} calibrates here: pass --calib TEXTFILE (calibration text, never the evaluation text)")
    if calib is not None and not calibrates:
        logger.warning("--calib is ignored by --method %s with these settings, which need no calibration data", method)
    return method, config


# -- table printing ---------------------------------------------------------------------------------------
def fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:,.4g}" if abs(v) < 1e4 else f"{v:,.0f}"
    return str(v)


def markdown_table(rows: list[dict], columns: list[str]) -> str:
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(fmt(r.get(c, "")) for c in columns) + " |" for r in rows]
    return "\n".join(lines)


# -- commands ---------------------------------------------------------------------------------------------
def evaluate(model, tokenizer, text, speed: bool, reference=None) -> dict:
    from .eval import evaluate_model, is_encoder, load_sentences

    kw = {}
    if is_encoder(model):
        kw["sentences"] = load_sentences(text) if text else None
        kw["reference"] = reference
    else:
        kw["text"] = text
    return evaluate_model(model, tokenizer, speed=speed, **kw)


def cmd_quantize(args) -> int:
    return compress_and_save(args, *build_config(args))


PRUNE_METHODS = ("magnitude", "wanda", "sparsegpt")


def prune_config(args):
    """The config of ``hf-compress prune``: ``--sparsity`` (fraction removed) or ``--pattern N:M``."""
    from .integrations import MagnitudePruneConfig, SparseGPTConfig, WandaConfig

    if args.sparsity is None and args.pattern is None:
        raise ValueError("pass --sparsity S (the fraction of weights removed, e.g. 0.5) or --pattern N:M (e.g. 2:4)")
    if args.sparsity is not None and args.pattern is not None:
        raise ValueError("pass either --sparsity or --pattern, not both (an N:M pattern fixes the sparsity at 1 - N/M)")
    fields = {"sparsity": args.sparsity if args.sparsity is not None else 0.5, "pattern": args.pattern}
    if args.skip:
        fields["modules_to_not_convert"] = args.skip
    quant = {k: v for k, v in (("bits", args.bits), ("group_size", args.group_size), ("sym", args.sym)) if v is not None}
    if quant and args.method != "sparsegpt":
        raise ValueError(f"--bits/--group-size/--sym quantize while pruning, which only --method sparsegpt does (got {args.method})")
    if args.refit_steps is not None:
        if args.method != "sparsegpt":
            raise ValueError(f"--refit-steps refits SparseGPT's kept weights, which only --method sparsegpt does (got {args.method})")
        quant["refit_steps"] = args.refit_steps
    owl = {k: v for k, v in (("owl_lambda", args.owl_lambda), ("owl_m", args.owl_m)) if v is not None}
    if owl and args.schedule != "owl":
        raise ValueError("--owl-lambda and --owl-m set the OWL schedule: add --schedule owl")
    if args.method == "magnitude":
        if args.schedule == "owl":
            raise ValueError("--schedule owl weighs blocks by outliers in calibration activations, which --method magnitude "
                             "does not use: use --method wanda or sparsegpt with --calib")
        if args.calib:
            logger.warning("--calib is ignored by --method magnitude, which needs no calibration data")
        return MagnitudePruneConfig(**fields)
    if args.calib is None:
        raise ValueError(f"--method {args.method} calibrates: pass --calib TEXTFILE (calibration text, never the evaluation text)")
    fields.update(dataset=str(args.calib), schedule=args.schedule, **owl,
                  **{k: v for k, v in (("n_samples", args.n_samples), ("seqlen", args.seqlen)) if v is not None})
    if args.method == "wanda":
        return WandaConfig(**fields)
    return SparseGPTConfig(**fields, **quant)


def cmd_prune(args) -> int:
    if args.structured:
        return cmd_prune_structured(args)
    if args.method is None:
        raise ValueError("pass --method magnitude|wanda|sparsegpt, or --structured for channel/head/block pruning")
    if args.mlp_ratio is not None or args.kv_heads is not None or args.drop_blocks is not None:
        raise ValueError("--mlp-ratio, --kv-heads and --drop-blocks are structured pruning flags: add --structured")
    return compress_and_save(args, args.method, prune_config(args))


def cmd_prune_structured(args) -> int:
    from .integrations.loading import load_model
    from .integrations.save import model_card, save_compressed
    from .integrations.structured import StructuredPruneConfig, prune_structured

    if args.method is not None or args.sparsity is not None or args.pattern is not None or args.bits is not None:
        raise ValueError("--structured removes whole channels, heads and blocks: it takes --mlp-ratio, --kv-heads and "
                         "--drop-blocks, not --method/--sparsity/--pattern/--bits")
    if args.mlp_ratio is None and args.kv_heads is None and not args.drop_blocks:
        raise ValueError("--structured needs something to remove: --mlp-ratio R (fraction of MLP channels kept), "
                         "--kv-heads K (key/value heads kept) and/or --drop-blocks N")
    if args.calib is None:
        raise ValueError("--structured ranks channels on calibration activations: pass --calib TEXTFILE (never the evaluation text)")
    fields = {k: v for k, v in (("n_samples", args.n_samples), ("seqlen", args.seqlen)) if v is not None}
    config = StructuredPruneConfig(mlp_ratio=1.0 if args.mlp_ratio is None else args.mlp_ratio, kv_heads=args.kv_heads,
                                   drop_blocks=args.drop_blocks or 0, importance=args.importance,
                                   compensate=args.compensate, dataset=str(args.calib), **fields)
    model, tokenizer = load_model(args.model)
    report = prune_structured(model, config)
    results = evaluate(model, tokenizer, args.eval_text, speed=False) if args.eval_text else None
    settings = {k: v for k, v in vars(config).items() if k not in ("dataset", "tokenizer")}
    card = model_card(str(args.model), "structured pruning", {**settings, **{k: report[k] for k in ("parameters_before", "parameters_after", "dropped_blocks")}}, results)
    out = save_compressed(model, args.output, tokenizer=tokenizer, card=card, results=results)
    print(f"wrote {out} ({report['parameters_after']:,} of {report['parameters_before']:,} parameters; a standard "
          f"{type(model).__name__}, loads without hf_compress)")
    return 0


def cmd_lowrank(args) -> int:
    from .integrations import LowRankConfig

    fields = {"method": args.method, "rank_allocation": args.rank_allocation}
    fields.update({k: v for k, v in (("param_ratio", args.param_ratio), ("rank", args.rank), ("bits", args.bits),
                                      ("group_size", args.group_size), ("sym", args.sym), ("n_samples", args.n_samples),
                                      ("seqlen", args.seqlen)) if v is not None})
    if args.skip:
        fields["modules_to_not_convert"] = args.skip
    if args.method == "svd":
        if args.calib:
            logger.warning("--calib is ignored by --method svd, which needs no calibration data")
    elif args.calib is None:
        raise ValueError(f"--method {args.method} calibrates: pass --calib TEXTFILE (calibration text, never the evaluation text)")
    else:
        fields["dataset"] = str(args.calib)
    return compress_and_save(args, f"lowrank-{args.method}", LowRankConfig(**fields))


def compress_and_save(args, method: str, config) -> int:
    """Load ``args.model`` compressed by ``config``, optionally evaluate it, and save it atomically with a model card."""
    from .integrations.loading import load_model
    from .integrations.save import model_card, save_compressed

    model, tokenizer = load_model(args.model, quantization_config=config)
    results = None
    if args.eval_text:
        from .eval import is_encoder

        reference = load_model(args.model)[0] if is_encoder(model) else None
        results = evaluate(model, tokenizer, args.eval_text, speed=False, reference=reference)
    card = model_card(str(args.model), method, config.to_dict(), results)
    out = save_compressed(model, args.output, tokenizer=tokenizer, card=card, results=results)
    print(f"wrote {out}")
    if results:
        print(markdown_table([{"model": str(out), **results}], ["model", *results]))
    return 0


def cmd_eval(args) -> int:
    from .integrations.loading import load_model

    model, tokenizer = load_model(args.model)
    reference = load_model(args.reference)[0] if args.reference else None
    results = evaluate(model, tokenizer, args.text, speed=not args.no_speed, reference=reference)
    results = {"model": str(args.model), **results}
    if args.json:
        print(json.dumps(results, sort_keys=True))
    else:
        print(markdown_table([results], list(results)))
    return 0


def read_results(folder: Path) -> dict:
    from .eval import disk_bytes
    from .integrations.save import EVAL_FILE

    f = folder / EVAL_FILE
    if not f.is_file():
        raise FileNotFoundError(f"{folder} has no {EVAL_FILE}: write it with `hf-compress quantize --eval-text` or `hf-compress eval --json`")
    row = json.loads(f.read_text())
    row["disk_bytes"] = disk_bytes(folder)
    cfg = json.loads((folder / "config.json").read_text()).get("quantization_config", {})
    row["method"] = cfg.get("quant_method", "float")
    row["bits"] = cfg.get("bits", "")
    row["group_size"] = cfg.get("group_size", "")
    return {"model": folder.name, **row}


def cmd_compare(args) -> int:
    rows = [read_results(Path(d)) for d in args.dirs]
    quality = "perplexity" if any("perplexity" in r for r in rows) else "embedding_cosine_mean"
    cols = ["model", "method", "bits", "group_size", "disk_bytes", quality]
    print(markdown_table(rows, cols))
    if args.plot:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6, 4))
        for r in rows:
            ax.scatter(r["disk_bytes"] / 2**20, r[quality])
            ax.annotate(r["model"], (r["disk_bytes"] / 2**20, r[quality]), fontsize=8)
        ax.set_xlabel("bytes on disk (MiB)")
        ax.set_ylabel(quality)
        ax.grid(alpha=0.3)
        fig.tight_layout()
        fig.savefig(args.plot, dpi=120)
        print(f"wrote {args.plot}")
    return 0


def cmd_export_gguf(args) -> int:
    import hf_compress  # noqa: F401  (an hf_compress folder reloads packed)

    from .formats.gguf import export_gguf
    from .integrations.loading import load_model

    model, tokenizer = load_model(args.src)
    out = export_gguf(model, tokenizer, args.output, qtype=args.qtype or "Q4_K_M", imatrix=args.calib, gptq=args.gptq,
                      n_samples=args.n_samples)
    print(f"wrote {out}")
    return 0


def cmd_export(args) -> int:
    if args.format == "gguf":
        return cmd_export_gguf(args)
    if args.qtype is not None or args.calib is not None or args.gptq:
        raise SystemExit("--qtype, --calib and --gptq apply to --format gguf only")
    if args.format == "bitsandbytes":
        from .formats.bitsandbytes import export_bitsandbytes as export
    elif args.format == "hf-bitnet":
        export = export_hf_bitnet
    else:
        from .formats.gptq import export_gptq as export

    out = export(args.src, args.output)
    print(f"wrote {out}")
    return 0


DISTILL_FLAGS = {
    "alpha": "alpha",
    "temperature": "temperature",
    "loss_type": "loss_type",
    "beta": "beta",
    "hidden_loss_weight": "hidden_loss_weight",
    "on_policy_fraction": "on_policy_fraction",
    "top_k": "top_k",
    "max_steps": "max_steps",
    "batch_size": "per_device_train_batch_size",
    "grad_accum": "gradient_accumulation_steps",
    "lr": "learning_rate",
    "seed": "seed",
}


def distill_settings(args) -> tuple[dict, dict]:
    """``(DistillationArguments fields, run settings)`` from a recipe and flags (flags win). Run settings:
    ``seq_len`` (128), ``student`` and ``eval_text``, which are not training arguments."""
    fields = load_recipe(args.recipe)
    run = {"seq_len": fields.pop("seq_len", 128), "student": fields.pop("student", None), "eval_text": fields.pop("eval_text", None)}
    fields.setdefault("max_steps", 500)
    fields.setdefault("learning_rate", 1e-3)
    fields.setdefault("per_device_train_batch_size", 8)
    fields.setdefault("dataloader_pin_memory", False)  # pinning only helps a GPU, and warns without one
    for flag, field in DISTILL_FLAGS.items():
        value = getattr(args, flag, None)
        if value is not None:
            fields[field] = value
    if args.bf16:
        fields["bf16"] = True
    for k in ("seq_len", "student", "eval_text"):
        if getattr(args, k, None) is not None:
            run[k] = getattr(args, k)
    if run["student"] is None:
        raise ValueError("pass --student S (a folder or Hub id, teacher:0,5 for the teacher's blocks 0 and 5, or random:2)")
    return fields, run


def cmd_distill(args) -> int:
    import tempfile

    from .distill import DistillationArguments, DistillationTrainer, text_chunks
    from .distill.student import resolve_student
    from .integrations.loading import load_model
    from .integrations.save import atomic_dir, model_card

    fields, run = distill_settings(args)
    if not Path(args.train).is_file():
        raise FileNotFoundError(f"training text not found: {args.train}")
    teacher, tokenizer = load_model(args.teacher)
    if tokenizer is None:
        raise ValueError(f"{args.teacher} has no tokenizer: distillation tokenizes --train with the teacher's tokenizer")
    student = resolve_student(str(run["student"]), teacher, seed=fields.get("seed", 42))
    train = text_chunks(tokenizer, args.train, seq_len=int(run["seq_len"]))
    with tempfile.TemporaryDirectory(prefix="hfc-distill-") as work:
        targs = DistillationArguments(output_dir=work, report_to=[], save_strategy="no", logging_steps=max(1, fields["max_steps"] // 20), **fields)
        trainer = DistillationTrainer(model=student, teacher_model=teacher, args=targs, train_dataset=train, processing_class=tokenizer)
        trainer.train()
    results = None
    if run["eval_text"]:
        from .eval import perplexity

        results = {"perplexity": perplexity(student.eval(), tokenizer, run["eval_text"]), "teacher_perplexity": perplexity(teacher, tokenizer, run["eval_text"])}
    settings = {"teacher": str(args.teacher), "student": str(run["student"]), "train": str(args.train), "seq_len": run["seq_len"], **fields}
    card = model_card(str(args.teacher), "distillation", settings, results).replace("compressed with hf-compress", "distilled with hf-compress")
    with atomic_dir(args.output) as tmp:
        trainer.save_model(str(tmp))
        (tmp / "README.md").write_text(card)
        if results:
            from .integrations.save import EVAL_FILE

            (tmp / EVAL_FILE).write_text(json.dumps(results, indent=2, sort_keys=True) + "\n")
    print(f"wrote {Path(args.output).resolve()}")
    if results:
        print(markdown_table([{"model": str(args.output), **results}], ["model", *results]))
    return 0


def export_hf_bitnet(src, dst) -> Path:
    """``export --format hf-bitnet``: load a folder ``quantize --method bitnet`` wrote and write transformers'
    ``bitnet`` format, with the folder's tokenizer and generation files."""
    from .formats.bitnet import export_bitnet
    from .integrations.loading import load_model

    src = Path(src)
    cfg = json.loads((src / "config.json").read_text()).get("quantization_config", {}) if (src / "config.json").is_file() else {}
    if cfg.get("quant_method") != "hf_compress_bitlinear":
        raise ValueError(f"{src} is not a folder written by `hf-compress quantize --method bitnet` (quant_method "
                         f"{cfg.get('quant_method')!r}); export --format hf-bitnet reads hf_compress_bitlinear folders")
    model, _ = load_model(str(src))
    extra = [p for p in src.iterdir() if p.is_file() and p.suffix != ".safetensors" and p.name not in ("config.json", "README.md")]
    return export_bitnet(model, dst, extra_files=extra)


def cmd_demo(args) -> int:
    from .demo import run_demo

    run_demo(args.model, args.text, args.output)
    return 0


# -- parser -----------------------------------------------------------------------------------------------
def bool_flag(v: str) -> bool:
    if v.lower() in ("1", "true", "yes"):
        return True
    if v.lower() in ("0", "false", "no"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {v!r}")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="hf-compress", description="Compress Hugging Face models.")
    sub = p.add_subparsers(dest="command", required=True)

    q = sub.add_parser("quantize", help="quantize a model and save it (reloads with from_pretrained after import hf_compress)")
    q.add_argument("model", help="local folder or Hub id")
    q.add_argument("--method", default=None, help="rtn (default), gptq, llm-int8, w8a8, bitnet (1.58/1-bit, packed, no training) or onebit (SVID-initialised)")
    q.add_argument("--bits", type=bits_arg, default=None, help="2, 3, 4 or 8; bitnet: 1.58 (default) or 1")
    q.add_argument("--group-size", dest="group_size", type=int, default=None, help="-1 (default) = per output channel")
    q.add_argument("--sym", type=bool_flag, default=None, help="true (default) or false (asymmetric)")
    q.add_argument("--skip", nargs="*", default=None, help="module names to keep in float")
    q.add_argument("--calib", default=None, help="calibration text file (gptq, static w8a8, --smooth; never the evaluation text)")
    q.add_argument("--act-order", dest="act_order", action="store_const", const=True, default=None, help="gptq: act-order (desc_act)")
    q.add_argument("--n-samples", dest="n_samples", type=int, default=None, help="gptq: calibration windows (128)")
    q.add_argument("--seqlen", type=int, default=None, help="gptq: tokens per window (min(2048, model positions))")
    q.add_argument("--seed", type=int, default=None, help="gptq: seed of the window offsets (0)")
    q.add_argument("--threshold", type=float, default=None, help="llm-int8: outlier magnitude (6.0)")
    q.add_argument("--mode", default=None, choices=["dynamic", "static"], help="w8a8: activation scales at run time (dynamic, default) or from calibration (static)")
    q.add_argument("--act-granularity", dest="act_granularity", default=None, choices=["per-token", "per-tensor"], help="w8a8: per-token (dynamic default) or per-tensor")
    q.add_argument("--observer", default=None, choices=["minmax", "moving-average", "percentile", "mse", "kl"], help="rtn, gptq: how group ranges are chosen (minmax|mse; gptq default mse); w8a8 static: how activation ranges are chosen (minmax)")
    q.add_argument("--smooth", type=float, default=None, metavar="ALPHA", help="w8a8: SmoothQuant migration strength in [0, 1] (e.g. 0.5)")
    q.add_argument("--recipe", default=None, help="YAML recipe (configs/*.yaml); flags override it")
    q.add_argument("--eval-text", default=None, help="measure perplexity (or embedding cosine) on this text for the model card")
    q.add_argument("--output", required=True)
    q.set_defaults(func=cmd_quantize)

    r = sub.add_parser("prune", help="prune a model (bitmask + kept values on disk; reloads with from_pretrained after import hf_compress)")
    r.add_argument("model", help="local folder or Hub id")
    r.add_argument("--method", default=None, choices=PRUNE_METHODS, help="unstructured / N:M pruning method")
    r.add_argument("--sparsity", type=float, default=None, help="fraction of each linear's weights removed, in [0, 1)")
    r.add_argument("--pattern", default=None, help="N:M semi-structured sparsity, e.g. 2:4 (at most N kept in every M)")
    r.add_argument("--calib", default=None, help="calibration text file (required by wanda and sparsegpt; never the evaluation text)")
    r.add_argument("--refit-steps", dest="refit_steps", type=int, default=None,
                   help="sparsegpt: conjugate-gradient steps refitting the kept weights after the mask is chosen (5; 0: off)")
    r.add_argument("--schedule", default="uniform", choices=["uniform", "owl"], help="wanda/sparsegpt: the same sparsity in every block, or OWL's outlier-weighted per-block sparsity")
    r.add_argument("--owl-lambda", dest="owl_lambda", type=float, default=None, help="--schedule owl: half the span of the block sparsities (0.08)")
    r.add_argument("--owl-m", dest="owl_m", type=float, default=None, help="--schedule owl: outlier threshold, a multiple of the mean score (5)")
    r.add_argument("--n-samples", dest="n_samples", type=int, default=None, help="calibration windows (128)")
    r.add_argument("--seqlen", type=int, default=None, help="tokens per window (min(2048, model positions))")
    r.add_argument("--bits", type=int, default=None, help="sparsegpt: also quantize to 2, 3, 4 or 8 bits in the same pass")
    r.add_argument("--group-size", dest="group_size", type=int, default=None, help="sparsegpt with --bits: -1 (default) = per output channel")
    r.add_argument("--sym", type=bool_flag, default=None, help="sparsegpt with --bits: true (default) or false")
    r.add_argument("--skip", nargs="*", default=None, help="module names to keep dense")
    r.add_argument("--structured", action="store_true", help="remove whole MLP channels, key/value heads and blocks (a smaller standard model)")
    r.add_argument("--mlp-ratio", dest="mlp_ratio", type=float, default=None, help="--structured: fraction of MLP channels kept, in (0, 1]")
    r.add_argument("--kv-heads", dest="kv_heads", type=int, default=None, help="--structured: key/value heads kept per layer")
    r.add_argument("--drop-blocks", dest="drop_blocks", type=int, default=None, help="--structured: decoder blocks removed")
    r.add_argument("--importance", default="activation", choices=["activation", "taylor"], help="--structured: channel score")
    r.add_argument("--compensate", action="store_true", help="--structured: fold removed channels' mean output into biases")
    r.add_argument("--eval-text", default=None, help="measure perplexity (or embedding cosine) on this text for the model card")
    r.add_argument("--output", required=True)
    r.set_defaults(func=cmd_prune)

    lr = sub.add_parser("lowrank", help="factorise every linear into two thin ones (reloads with from_pretrained after import hf_compress)")
    lr.add_argument("model", help="local folder or Hub id")
    lr.add_argument("--method", default="svd", choices=["svd", "asvd", "whiten"])
    lr.add_argument("--param-ratio", dest="param_ratio", type=float, default=None, help="fraction of each linear's weights kept, in (0, 1]")
    lr.add_argument("--rank", type=int, default=None, help="one rank for every linear (instead of --param-ratio)")
    lr.add_argument("--rank-allocation", dest="rank_allocation", default="uniform", choices=["uniform", "sensitivity"],
                    help="with --param-ratio: the same ratio per linear, or ranks shared out across linears by their spectra")
    lr.add_argument("--calib", default=None, help="calibration text file (required by asvd and whiten; never the evaluation text)")
    lr.add_argument("--n-samples", dest="n_samples", type=int, default=None, help="calibration windows (128)")
    lr.add_argument("--seqlen", type=int, default=None, help="tokens per window (min(2048, model positions))")
    lr.add_argument("--bits", type=int, default=None, help="also quantize the factors (RTN) to 2, 3, 4 or 8 bits")
    lr.add_argument("--group-size", dest="group_size", type=int, default=None, help="with --bits: -1 (default) = per output channel")
    lr.add_argument("--sym", type=bool_flag, default=None, help="with --bits: true (default) or false")
    lr.add_argument("--skip", nargs="*", default=None, help="module names to keep dense")
    lr.add_argument("--eval-text", default=None, help="measure perplexity on this text for the model card")
    lr.add_argument("--output", required=True)
    lr.set_defaults(func=cmd_lowrank)

    e = sub.add_parser("eval", help="perplexity (or embedding stats), sizes and tokens/s")
    e.add_argument("model")
    e.add_argument("--text", required=True, help="evaluation text file")
    e.add_argument("--reference", default=None, help="float model to compare embeddings with (encoders)")
    e.add_argument("--no-speed", action="store_true")
    e.add_argument("--json", action="store_true", help="print one JSON object")
    e.set_defaults(func=cmd_eval)

    c = sub.add_parser("compare", help="tabulate several compressed outputs")
    c.add_argument("dirs", nargs="+")
    c.add_argument("--plot", default=None, help="PNG: quality against bytes on disk")
    c.set_defaults(func=cmd_compare)

    x = sub.add_parser("export", help="rewrite a compressed folder in another tool's format")
    x.add_argument("src", help="a folder written by hf-compress quantize (gguf: also a float model folder or Hub id)")
    x.add_argument(
        "--format",
        required=True,
        choices=["gptq", "bitsandbytes", "hf-bitnet", "gguf"],
        help="gptq: quant_method gptq (GPTQModel, vLLM), from rtn/gptq folders; bitsandbytes: an 8-bit "
        "bitsandbytes checkpoint (from_pretrained with bitsandbytes), from llm-int8 folders; hf-bitnet: transformers' "
        "own bitnet format (stock from_pretrained), from bitnet folders (per-tensor ternary); gguf: one llama.cpp "
        "file (Ollama, LM Studio), from a float model or any hf_compress folder",
    )
    x.add_argument("--output", required=True, help="a folder (gguf: a FILE.gguf)")
    x.add_argument("--qtype", default=None, help="gguf: Q8_0, Q6_K, Q5_K_M, Q4_K_M (default), Q3_K_M, Q2_K, Q4_0, TQ1_0, TQ2_0, ...")
    x.add_argument("--calib", default=None, help="gguf: calibration text file for an importance matrix (imatrix)")
    x.add_argument("--gptq", action="store_true", help="gguf: fill the blocks by GPTQ on the --calib text (scales as llama.cpp)")
    x.add_argument("--n-samples", type=int, default=64, help="gguf: calibration windows of 256 tokens (default 64)")
    x.set_defaults(func=cmd_export)

    k = sub.add_parser("distill", help="train a student on a teacher's distributions (DistillationTrainer)")
    k.add_argument("--teacher", required=True, help="folder or Hub id of the teacher (may be hf_compress-quantized)")
    k.add_argument("--student", default=None, help="folder or Hub id; teacher:0,5 (the teacher's blocks 0 and 5); teacher:2 or random:2 (2 blocks)")
    k.add_argument("--train", required=True, help="training text file (never the evaluation text)")
    k.add_argument("--output", required=True)
    k.add_argument("--recipe", default=None, help="YAML of DistillationArguments fields plus seq_len/student/eval_text; flags override it")
    k.add_argument("--seq-len", dest="seq_len", type=int, default=None, help="tokens per training chunk (128)")
    k.add_argument("--max-steps", dest="max_steps", type=int, default=None, help="optimizer steps (500)")
    k.add_argument("--batch-size", dest="batch_size", type=int, default=None, help="sequences per step and process (8)")
    k.add_argument("--grad-accum", dest="grad_accum", type=int, default=None)
    k.add_argument("--lr", type=float, default=None, help="learning rate (1e-3)")
    k.add_argument("--alpha", type=float, default=None, help="soft-loss weight in [0, 1] (0.5)")
    k.add_argument("--temperature", type=float, default=None, help="softmax temperature (1.0)")
    k.add_argument("--loss-type", dest="loss_type", default=None, choices=["forward_kl", "reverse_kl", "jsd", "mse"])
    k.add_argument("--beta", type=float, default=None, help="JSD beta (0.5)")
    k.add_argument("--hidden-loss-weight", dest="hidden_loss_weight", type=float, default=None)
    k.add_argument("--on-policy-fraction", dest="on_policy_fraction", type=float, default=None, help="GKD lambda (0)")
    k.add_argument("--top-k", dest="top_k", type=int, default=None, help="compare on the teacher's top-k ids only")
    k.add_argument("--seed", type=int, default=None)
    k.add_argument("--bf16", action="store_true", help="bf16 mixed precision")
    k.add_argument("--eval-text", dest="eval_text", default=None, help="held-out text: student and teacher perplexity for the model card")
    k.set_defaults(func=cmd_distill)

    d = sub.add_parser("demo", help="compress the local default model and print a before/after table")
    d.add_argument("--model", default=None)
    d.add_argument("--text", default=None)
    d.add_argument("--output", default="out/demo")
    d.set_defaults(func=cmd_demo)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.set_verbosity_info() if getattr(args, "verbose", False) else logging.set_verbosity_warning()
    try:
        if getattr(args, "calib", None) and not Path(args.calib).is_file():
            raise FileNotFoundError(f"calibration text not found: {args.calib}")
        return args.func(args)
    except (FileNotFoundError, ValueError) as e:
        print(f"hf-compress: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
