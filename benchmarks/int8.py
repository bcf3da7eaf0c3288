"""Int8 activation quantization: LLM.int8 and W8A8 (dynamic, static with each observer, SmoothQuant).

Quality: perplexity on ``../shared/data/pydoc-heldout.txt`` of pydoc-llama-6m and of its "outlier" variant
(:func:`outliers.add_outlier_features`: an exact reparametrisation putting 20-60x outlier features into the
inputs of q/k/v and gate/up, as large LLMs have), for fp32; W8A8 dynamic per-tensor and per-token; LLM.int8
(threshold 6); static W8A8 (per-tensor) with the min-max, moving-average, percentile, MSE and KL observers;
SmoothQuant (alpha 0.5) dynamic per-token and static min-max. Static scales and smoothing factors are
calibrated on ``pydoc-calib.txt`` (``--n-samples`` windows of 256 tokens), never on the evaluation text. The
LLM.int8 rows also give the outlier rate: the fraction of input columns sent to the float path.

Speed: the 1B-shaped Llama of ``benchmarks/speed.py`` (random weights), prefill tokens/s at 1x512 and 8x128
and batch-1 decode tokens/s, for fp32, bf16, W8A8 (dynamic per-token, bf16 activations) and LLM.int8
(bf16 activations) on a copy of the model given outlier features at the rate the pydoc outlier model shows,
all loaded together and measured alternately (``--rounds``, order rotating); ratios are medians of per-round
ratios. bitsandbytes' CPU int8 is added when it imports (it is not installable offline here).

    python benchmarks/int8.py --quick     # a smoke test (few samples, 2 layers)
    python benchmarks/int8.py             # about 15 minutes on 2 idle cores
"""

from __future__ import annotations

import argparse
import copy
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402

CALIB = common.SHARED / "data" / "pydoc-calib.txt"
OBSERVERS = ("minmax", "moving-average", "percentile", "mse", "kl")
FLOORS = {"int8_vs_fp32": 1.01, "w8a8_vs_fp32": 1.01, "decode_vs_bf16": 1.6, "prefill_vs_bf16": 1.0, "mixed_vs_w8a8": 1.3}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="few calibration samples, 2 layers, 1 round")
    p.add_argument("--n-samples", type=int, default=None, help="calibration windows (default 128; 16 with --quick)")
    p.add_argument("--layers", type=int, default=None, help="layers of the 1B-shaped model (16; 2 with --quick)")
    p.add_argument("--rounds", type=int, default=None, help="speed rounds (3; 1 with --quick)")
    p.add_argument("--new-tokens", type=int, default=32, help="decoded tokens per measurement")
    p.add_argument("--skip-quality", action="store_true")
    p.add_argument("--skip-speed", action="store_true")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=str(common.default_out("int8")))
    args = p.parse_args(argv)
    args.n_samples = args.n_samples or (16 if args.quick else 128)
    args.layers = args.layers or (2 if args.quick else 16)
    args.rounds = args.rounds or (1 if args.quick else 3)
    return args


# -- quality ----------------------------------------------------------------------------------------------
def quality_configs(n_samples: int) -> list[tuple[str, object]]:
    from hf_compress import Int8MixedConfig, W8A8Config

    cal = {"dataset": str(CALIB), "n_samples": n_samples, "seqlen": 256}
    rows = [
        ("fp32", None),
        ("W8A8 dynamic per-tensor", W8A8Config(act_granularity="per-tensor")),
        ("W8A8 dynamic per-token", W8A8Config()),
        ("LLM.int8 (threshold 6)", Int8MixedConfig(threshold=6.0)),
    ]
    rows += [(f"W8A8 static {o}", W8A8Config(mode="static", observer=o, **cal)) for o in OBSERVERS]
    rows += [
        ("SmoothQuant 0.5 dynamic per-token", W8A8Config(smooth_alpha=0.5, **cal)),
        ("SmoothQuant 0.5 static minmax", W8A8Config(mode="static", smooth_alpha=0.5, **cal)),
    ]
    return rows


class OutlierCounter:
    """Counts, over every Int8MixedLinear call, the input columns LLM.int8 sends to the float path."""

    def __init__(self, model, threshold: float):
        from hf_compress import Int8MixedLinear
        from hf_compress.quant.int8 import outlier_columns

        self.flagged = self.columns = 0
        self.by_layer: dict[str, list[int]] = {}

        def hook(module, args, name):
            cols = int(outlier_columns(args[0], threshold).sum())
            self.flagged += cols
            self.columns += module.in_features
            stats = self.by_layer.setdefault(name.rsplit(".", 1)[-1], [0, 0])
            stats[0] += cols
            stats[1] += module.in_features

        self.handles = [
            m.register_forward_pre_hook(lambda mod, a, n=n: hook(mod, a, n))
            for n, m in model.named_modules()
            if isinstance(m, Int8MixedLinear)
        ]

    def rate(self, names=None) -> float:
        if names is None:
            return self.flagged / max(self.columns, 1)
        f = sum(self.by_layer.get(n, [0, 0])[0] for n in names)
        c = sum(self.by_layer.get(n, [0, 0])[1] for n in names)
        return f / max(c, 1)

    def remove(self):
        for h in self.handles:
            h.remove()


NORM_FED = ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj")


def run_quality(args, tmp: Path) -> tuple[list[dict], dict]:
    import torch
    from outliers import add_outlier_features
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from hf_compress.eval import perplexity_stats

    tok = AutoTokenizer.from_pretrained(common.PYDOC_MODEL)
    text = common.HELDOUT.read_text()
    base = AutoModelForCausalLM.from_pretrained(common.PYDOC_MODEL, dtype=torch.float32).eval()
    outlier = copy.deepcopy(base)
    planted = add_outlier_features(outlier, seed=args.seed)
    dirs = {"original": common.PYDOC_MODEL, "outlier": tmp / "pydoc-outlier"}
    outlier.save_pretrained(dirs["outlier"])
    tok.save_pretrained(dirs["outlier"])
    del base, outlier

    rows, rates = [], {}
    for label, cfg in quality_configs(args.n_samples):
        row = {"config": label}
        for model_name, path in dirs.items():
            t0 = time.perf_counter()
            kw = {"quantization_config": copy.deepcopy(cfg)} if cfg is not None else {}
            model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, **kw).eval()
            load_s = time.perf_counter() - t0
            counter = OutlierCounter(model, 6.0) if label.startswith("LLM.int8") else None
            ppl = perplexity_stats(model, tok, text, seqlen=256, progress=False)["perplexity"]
            row[f"{model_name} ppl"] = ppl
            row[f"{model_name} quantize s"] = load_s
            if counter is not None:
                rates[model_name] = {"all linears": counter.rate(), "q/k/v/gate/up": counter.rate(NORM_FED)}
                row[f"{model_name} outlier cols"] = counter.rate()
                counter.remove()
            del model
        rows.append(row)
        print(f"  {label}: " + ", ".join(f"{k} {common.fmt(v)}" for k, v in row.items() if "ppl" in k), file=sys.stderr)
    fp32 = rows[0]
    for row in rows:
        for m in dirs:
            row[f"{m} / fp32"] = row[f"{m} ppl"] / fp32[f"{m} ppl"]
    return rows, {"planted": planted, "outlier_rate": rates}


def quality_floors(rows: list[dict]) -> list[dict]:
    by = {r["config"]: r for r in rows}
    mixed = by["LLM.int8 (threshold 6)"]["outlier / fp32"]
    per_tensor = by["W8A8 dynamic per-tensor"]["outlier / fp32"]
    minmax = by["W8A8 static minmax"]["outlier ppl"]
    best = min(by[f"W8A8 static {o}"]["outlier ppl"] for o in ("percentile", "mse", "kl"))
    return [
        common.floor_row("outlier model: LLM.int8 ppl / fp32", mixed, "<=", FLOORS["int8_vs_fp32"]),
        {
            "floor": "outlier model: W8A8 per-tensor visibly worse (ppl / fp32)",
            "measured": per_tensor,
            "required": f"> LLM.int8's {mixed:.4f}",
            "status": "PASS" if per_tensor > mixed * 1.01 else "FAIL",
        },
        {
            "floor": "outlier model: best of static percentile/MSE/KL beats min-max (ppl)",
            "measured": best,
            "required": f"< min-max {minmax:.4f}",
            "status": "PASS" if best < minmax else "FAIL",
        },
        common.floor_row(
            "original model: W8A8 dynamic per-token ppl / fp32", by["W8A8 dynamic per-token"]["original / fp32"], "<=", FLOORS["w8a8_vs_fp32"]
        ),
    ]


# -- speed ------------------------------------------------------------------------------------------------
def speed_models(args, tmp: Path, outlier_rate: float) -> tuple[dict, dict]:
    import torch
    from outliers import add_outlier_features
    from speed import llama_config
    from transformers import AutoModelForCausalLM, LlamaForCausalLM

    from hf_compress import Int8MixedConfig, W8A8Config

    cfg_args = argparse.Namespace(layers=args.layers, kv_heads=4)
    torch.manual_seed(args.seed)
    model = LlamaForCausalLM(llama_config(cfg_args)).eval()
    n_channels = max(1, round(outlier_rate * model.config.hidden_size))
    dirs = {"bf16": tmp / "bf16", "fp32": tmp / "fp32", "outlier-bf16": tmp / "outlier-bf16"}
    model.save_pretrained(dirs["fp32"])
    model.to(torch.bfloat16).save_pretrained(dirs["bf16"])
    model.to(torch.float32)
    add_outlier_features(model, n_channels=n_channels, seed=args.seed)
    model.to(torch.bfloat16).save_pretrained(dirs["outlier-bf16"])
    del model

    def load(src, dtype, cfg=None):
        kw = {"quantization_config": cfg} if cfg is not None else {}
        return AutoModelForCausalLM.from_pretrained(dirs[src], dtype=dtype, **kw).eval()

    models = {
        "fp32": load("fp32", torch.float32),
        "bf16": load("bf16", torch.bfloat16),
        "W8A8 dynamic per-token": load("bf16", torch.bfloat16, W8A8Config()),
        "LLM.int8": load("outlier-bf16", torch.bfloat16, Int8MixedConfig()),
    }
    try:
        import bitsandbytes  # noqa: F401
        from transformers import BitsAndBytesConfig

        models["bitsandbytes int8"] = load("outlier-bf16", torch.bfloat16, BitsAndBytesConfig(load_in_8bit=True))
    except Exception as e:  # noqa: BLE001 - reported, not fatal
        print(f"  bitsandbytes int8 not measured: {type(e).__name__}: {str(e).splitlines()[0][:120]}", file=sys.stderr)
    return models, {"n_outlier_channels": n_channels, "hidden": 2048}


def measure(model, args, warm=False) -> dict:
    from hf_compress.eval import tokens_per_second

    kw = {"repeats": 1, "warmup": 0, "seed": args.seed}
    new = 2 if warm else args.new_tokens
    a = tokens_per_second(model, None, prompt_len=32, new_tokens=new, prefill_len=512, batch_size=1, **kw)
    b = tokens_per_second(model, None, prompt_len=32, new_tokens=2, prefill_len=128, batch_size=8, **kw)
    return {"decode tok/s": a["decode_tok_s"], "prefill 1x512 tok/s": a["prefill_tok_s"], "prefill 8x128 tok/s": b["prefill_tok_s"]}


METRICS = ("decode tok/s", "prefill 1x512 tok/s", "prefill 8x128 tok/s")


def run_speed(args, tmp: Path, outlier_rate: float) -> tuple[list[dict], dict]:
    models, info = speed_models(args, tmp, outlier_rate)
    counter = OutlierCounter(models["LLM.int8"], 6.0)
    for m in models.values():
        measure(m, args, warm=True)
    info["LLM.int8 outlier cols (1B, all linears)"] = counter.rate()
    info["LLM.int8 outlier cols (1B, q/k/v/gate/up)"] = counter.rate(NORM_FED)
    counter.remove()
    names = list(models)
    per_round = {n: [] for n in names}
    for r in range(args.rounds):
        for n in names[r % len(names) :] + names[: r % len(names)]:
            per_round[n].append(measure(models[n], args))
    rows = []
    for n in names:
        row = {"config": n}
        for k in METRICS:
            row[k] = common.median([m[k] for m in per_round[n]])
            for ref in ("bf16", "W8A8 dynamic per-token"):
                if n != ref:
                    row[f"{k.split(' tok/s')[0]} / {ref.split(' ')[0]}"] = common.median(
                        [a[k] / b[k] for a, b in zip(per_round[n], per_round[ref], strict=True)]
                    )
        rows.append(row)
    return rows, info


def speed_floors(rows: list[dict]) -> list[dict]:
    by = {r["config"]: r for r in rows}
    w, m = by["W8A8 dynamic per-token"], by["LLM.int8"]
    out = [
        common.floor_row("W8A8 batch-1 decode / bf16", w["decode / bf16"], ">=", FLOORS["decode_vs_bf16"]),
        common.floor_row("W8A8 1x512 prefill / bf16", w["prefill 1x512 / bf16"], ">=", FLOORS["prefill_vs_bf16"]),
    ]
    for k in ("decode", "prefill 1x512", "prefill 8x128"):
        out.append(common.floor_row(f"LLM.int8 {k} time / W8A8 time", 1 / m[f"{k} / W8A8"], "<=", FLOORS["mixed_vs_w8a8"]))
    bnb = by.get("bitsandbytes int8")
    if bnb is not None:
        out.append(common.floor_row("LLM.int8 decode / bitsandbytes decode", m["decode tok/s"] / bnb["decode tok/s"], ">=", 1.0))
    return out


def main(argv=None) -> int:
    args = parse_args(argv)
    threads = common.setup(args.threads)
    payload = {"environment": common.environment(), "threads": threads, "args": vars(args)}
    outlier_rate = 4 / 256  # the pydoc outlier model's planted rate, until measured
    with tempfile.TemporaryDirectory(prefix="hfc-int8-") as tmp:
        tmp = Path(tmp)
        if not args.skip_quality:
            t0 = time.perf_counter()
            rows, info = run_quality(args, tmp)
            outlier_rate = info["outlier_rate"]["outlier"]["q/k/v/gate/up"]
            cols = ["config", "original ppl", "original / fp32", "outlier ppl", "outlier / fp32", "outlier quantize s"]
            print(f"## Perplexity, pydoc-llama-6m and its outlier variant ({args.n_samples} x 256 calibration tokens)\n")
            print(common.markdown_table(rows, cols))
            print(f"\nLLM.int8 outlier rate (input columns in float): {info['outlier_rate']}")
            floors = quality_floors(rows)
            print("\n" + common.floors_table(floors) + "\n")
            payload["quality"] = {"rows": rows, **info, "floors": floors, "seconds": time.perf_counter() - t0}
        if not args.skip_speed:
            t0 = time.perf_counter()
            rows, info = run_speed(args, tmp, outlier_rate)
            cols = ["config", *METRICS, "decode / bf16", "prefill 1x512 / bf16", "prefill 8x128 / bf16"]
            cols += ["decode / W8A8", "prefill 1x512 / W8A8", "prefill 8x128 / W8A8"]
            print(f"## Speed, 1B-shaped Llama ({args.layers} layers), {threads} threads, {args.rounds} rounds alternating\n")
            print(common.markdown_table(rows, cols))
            print(f"\n{info}")
            floors = speed_floors(rows)
            print("\n" + common.floors_table(floors) + "\n")
            payload["speed"] = {"rows": rows, **info, "floors": floors, "seconds": time.perf_counter() - t0}
    out = common.write_json(args.out, payload)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
