"""BitNet b1.58, 1-bit BitNet and OneBit: quality after conversion by distillation, storage, and decode speed.

Quality, on ``../shared/models/pydoc-llama-6m`` and ``../shared/data/pydoc-heldout.txt`` (the project's
perplexity convention): float; with no training, absmean ternary, sign 1-bit and SVID (OneBit's start); RTN
2-bit per-channel and g64, GPTQ 2-bit g64 (128 x 256 calibration tokens of pydoc-calib.txt); then b1.58,
1-bit BitNet, OneBit and OneBit with the paper's output LayerNorm, each converted by the same distillation
(teacher: the float model; logits KL + hidden-state MSE, OneBit's loss; ``--steps`` steps x 8 x 128 tokens of
pydoc-api-train.txt + pydoc-calib.txt; AdamW, cosine; BitNet with a λ warm-up over the first 10%). Per row:
bits per linear weight and packed bytes against the fp32 linears (the output head stays float in every row).

Speed: batch-1 decode tokens/s of the 1B-shaped random Llama of ``benchmarks/speed.py`` (bf16 activations;
the output head stays bf16, as the default configs leave it) for fp32, bf16, our int4 g128, ternary and binary,
and transformers' own BitLinear on CPU (our ternary weights exported with ``export_bitnet`` and loaded by stock
``from_pretrained``; it unpacks the weights every forward through ``torch.compile``, so it gets few tokens),
alternately in one run, with the bandwidth bound (bytes read per token / measured copy bandwidth) beside them.

    python benchmarks/bitnet.py --quick     # smoke test: 20 steps, 2-layer speed model
    python benchmarks/bitnet.py             # about 50 minutes on 2 cores
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "examples"))


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--steps", type=int, default=None, help="distillation steps per converted row (1000; 20 with --quick)")
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--layers", type=int, default=None, help="layers of the 1B-shaped speed model (16; 2 with --quick)")
    p.add_argument("--rounds", type=int, default=None, help="speed rounds (3; 1 with --quick)")
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--skip-quality", action="store_true")
    p.add_argument("--skip-speed", action="store_true")
    p.add_argument("--skip-hf-bitlinear", action="store_true", help="leave transformers' BitLinear out of the speed table")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=str(common.default_out("bitnet")))
    a = p.parse_args(argv)
    a.steps = a.steps or (20 if a.quick else 1000)
    a.layers = a.layers or (2 if a.quick else 16)
    a.rounds = a.rounds or (1 if a.quick else 3)
    return a


def linear_storage(model) -> dict:
    """Bits per weight and bytes of the block linears (the output head excluded), against their fp32 bytes."""
    import torch

    packed = weights = 0
    for name, m in model.named_modules():
        if name.endswith("lm_head") or not hasattr(m, "in_features") or isinstance(m, torch.nn.Embedding):
            continue
        if callable(getattr(m, "packed_weight_bytes", None)):
            packed += m.packed_weight_bytes()
        elif isinstance(m, torch.nn.Linear):
            packed += m.weight.numel() * 4
        else:
            continue
        weights += m.in_features * m.out_features
    return {"bits/weight": 8 * packed / weights, "bytes / fp32": packed / (4 * weights), "linear bytes": packed}


# -- quality ----------------------------------------------------------------------------------------------
def quality_rows(args) -> list[dict]:
    import bitnet_convert
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from hf_compress import BitLinearConfig, GPTQConfig, OneBitConfig, RTNConfig
    from hf_compress.eval import perplexity

    tok = AutoTokenizer.from_pretrained(common.PYDOC_MODEL)

    def ppl(model):
        return perplexity(model.eval(), tok, common.HELDOUT, progress=False)

    def load(cfg=None):
        kw = {"quantization_config": cfg} if cfg is not None else {}
        return AutoModelForCausalLM.from_pretrained(common.PYDOC_MODEL, **kw)

    rows = []
    calib = {"dataset": str(common.SHARED / "data" / "pydoc-calib.txt"), "n_samples": 128, "seqlen": 256}
    for name, cfg in [
        ("float", None),
        ("ternary absmean, no training", BitLinearConfig()),
        ("1-bit sign, no training", BitLinearConfig(bits=1)),
        ("OneBit SVID, no training", OneBitConfig()),
        ("RTN 2-bit per-channel", RTNConfig(bits=2, group_size=-1, sym=False)),
        ("RTN 2-bit g64", RTNConfig(bits=2, group_size=64, sym=False)),
        ("GPTQ 2-bit g64", GPTQConfig(bits=2, group_size=64, sym=False, **calib)),
    ]:
        t0 = time.perf_counter()
        model = load(cfg)
        rows.append({"row": name, "ppl": ppl(model), **linear_storage(model), "seconds": time.perf_counter() - t0})
        print(f"  {name}: ppl {rows[-1]['ppl']:.2f}", file=sys.stderr)
    for name, extra in [
        ("b1.58 converted", ["--method", "bitnet", "--bits", "1.58"]),
        ("1-bit BitNet converted", ["--method", "bitnet", "--bits", "1"]),
        ("OneBit converted", ["--method", "onebit"]),
        ("OneBit + LayerNorm converted", ["--method", "onebit", "--layernorm"]),
    ]:
        t0 = time.perf_counter()
        conv_args = bitnet_convert.parse([*extra, "--steps", str(args.steps), "--lr", str(args.lr), "--hidden-weight", "1.0",
                                          "--seed", str(args.seed)])
        model, res = bitnet_convert.convert(conv_args, log=lambda r: None)
        rows.append({"row": name, "ppl": res["converted"], "ppl before training": res["quantized, no training"],
                     **linear_storage(model), "seconds": time.perf_counter() - t0, "tokens": res["tokens"]})
        print(f"  {name}: ppl {rows[-1]['ppl']:.2f} (from {res['quantized, no training']:.1f})", file=sys.stderr)
    fl = rows[0]["ppl"]
    for r in rows:
        r["ppl / float"] = r["ppl"] / fl
    return rows


def quality_floors(rows) -> list[dict]:
    by = {r["row"]: r for r in rows}
    fl, untrained, conv = by["float"]["ppl"], by["b1.58 converted"]["ppl before training"], by["b1.58 converted"]["ppl"]
    ob, b1, rtn = by["OneBit converted"]["ppl"], by["1-bit BitNet converted"]["ppl"], by["RTN 2-bit per-channel"]["ppl"]
    return [
        common.floor_row("b1.58 conversion: share of the untrained-ternary gap recovered", (untrained - conv) / (untrained - fl), ">=", 0.7),
        common.floor_row("OneBit ppl / 1-bit BitNet ppl (same data, steps, teacher)", ob / b1, "<", 1.0),
        common.floor_row("OneBit ppl / RTN 2-bit per-channel ppl", ob / rtn, "<", 1.0),
        common.floor_row("packed ternary linear bytes / fp32", by["ternary absmean, no training"]["bytes / fp32"], "<=", 1 / 14),
    ]


# -- speed ------------------------------------------------------------------------------------------------
def speed_rows(args, tmp: Path) -> tuple[list[dict], dict]:
    import torch
    from speed import llama_config
    from transformers import AutoModelForCausalLM, LlamaForCausalLM

    import hf_compress
    from hf_compress import BitLinearConfig, RTNConfig
    from hf_compress.eval import tokens_per_second

    torch.manual_seed(args.seed)
    model = LlamaForCausalLM(llama_config(argparse.Namespace(layers=args.layers, kv_heads=4))).eval()
    model.save_pretrained(tmp / "fp32")
    model.to(torch.bfloat16).save_pretrained(tmp / "bf16")
    del model

    def load(src, dtype, cfg=None):
        kw = {"quantization_config": cfg} if cfg is not None else {}
        return AutoModelForCausalLM.from_pretrained(tmp / src, dtype=dtype, **kw).eval()

    models = {
        "fp32": load("fp32", torch.float32),
        "bf16": load("bf16", torch.bfloat16),
        "hf_compress int4 g128": load("bf16", torch.bfloat16, RTNConfig(bits=4, group_size=128)),
        "ternary (b1.58)": load("bf16", torch.bfloat16, BitLinearConfig()),
        "binary (1-bit)": load("bf16", torch.bfloat16, BitLinearConfig(bits=1)),
    }
    info = {"backend (ternary)": hf_compress.kernels.lowbit.backend_for(models["ternary (b1.58)"].model.layers[0].mlp.down_proj,
                                                                          torch.zeros(1, 2048, dtype=torch.bfloat16))}
    if not args.skip_hf_bitlinear:
        hf_compress.export_bitnet(models["ternary (b1.58)"], tmp / "hf-bitnet")
        models["transformers BitLinear (CPU)"] = AutoModelForCausalLM.from_pretrained(tmp / "hf-bitnet", dtype=torch.bfloat16).eval()

    bandwidth = common.memcopy_bandwidth()
    info["copy bandwidth GB/s"] = bandwidth / 1e9

    def bytes_read(m) -> int:  # every parameter and buffer but the input embedding is read once per token
        emb = m.get_input_embeddings().weight
        return sum(common.tensor_nbytes(t) for t in [*m.parameters(), *m.buffers()] if t is not emb)

    def measure(m, name, warm=False):
        new = 2 if warm else (4 if name.startswith("transformers") else args.new_tokens)
        r = tokens_per_second(m, None, prompt_len=16, new_tokens=new, prefill_len=16, batch_size=1, repeats=1, warmup=0,
                              seed=args.seed)
        return r["decode_tok_s"]

    for name, m in models.items():
        t0 = time.perf_counter()
        measure(m, name, warm=True)
        print(f"  warm-up {name}: {time.perf_counter() - t0:.1f} s", file=sys.stderr)
    names = list(models)
    per_round = {n: [] for n in names}
    for r in range(args.rounds):
        for n in names[r % len(names):] + names[: r % len(names)]:
            per_round[n].append(measure(models[n], n))
    rows = []
    for n in names:
        row = {"config": n, "decode tok/s": common.median(per_round[n]), "bytes/token": bytes_read(models[n])}
        row["bound tok/s"] = bandwidth / row["bytes/token"]
        row["% of bound"] = 100 * row["decode tok/s"] / row["bound tok/s"]
        for ref in ("bf16", "hf_compress int4 g128"):
            if n != ref:
                row[f"/ {ref.split(' ')[-1] if ref != 'bf16' else 'bf16'}"] = common.median(
                    [a / b for a, b in zip(per_round[n], per_round[ref], strict=True)])
        rows.append(row)
    return rows, info


def speed_floors(rows) -> list[dict]:
    by = {r["config"]: r for r in rows}
    t = by["ternary (b1.58)"]
    return [
        common.floor_row("ternary decode / bf16", t["/ bf16"], ">=", 3.5),
        common.floor_row("ternary decode / our int4 g128", t["/ g128"], ">", 1.0),
    ]


def main(argv=None) -> int:
    args = parse_args(argv)
    threads = common.setup(args.threads)
    payload = {"environment": common.environment(), "threads": threads, "args": vars(args)}
    if not args.skip_quality:
        rows = quality_rows(args)
        cols = ["row", "ppl", "ppl / float", "ppl before training", "bits/weight", "bytes / fp32", "seconds"]
        print(f"## Quality, pydoc-llama-6m ({args.steps} distillation steps x 8 x 128 tokens per converted row)\n")
        print(common.markdown_table(rows, cols))
        floors = quality_floors(rows)
        print("\n" + common.floors_table(floors) + "\n")
        payload["quality"] = {"rows": rows, "floors": floors}
    if not args.skip_speed:
        with tempfile.TemporaryDirectory(prefix="hfc-bitnet-") as tmp:
            rows, info = speed_rows(args, Path(tmp))
        cols = ["config", "decode tok/s", "/ bf16", "/ g128", "bytes/token", "bound tok/s", "% of bound"]
        print(f"## Batch-1 decode, 1B-shaped Llama ({args.layers} layers, bf16 activations, head bf16), {threads} threads, "
              f"{args.rounds} rounds alternating\n")
        print(common.markdown_table(rows, cols))
        print(f"\n{info}")
        floors = speed_floors(rows)
        print("\n" + common.floors_table(floors) + "\n")
        payload["speed"] = {"rows": rows, **info, "floors": floors}
    print(f"wrote {common.write_json(args.out, payload)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
