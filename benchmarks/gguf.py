"""GGUF benchmark on pydoc-llama-6m: our files against llama.cpp's, scored by llama.cpp and by us, side by side.

Rows (perplexity: the first 20,000 tokens of pydoc-heldout in 256-token windows, the project's convention; the same
windows go to llama.cpp, each window evaluated from an empty cache):

- float, and our F32 / Q8_0 / Q6_K / Q5_K_M / Q4_K_M / Q3_K_M / Q2_K exports, Q4_K_M (Q3_K_M, Q2_K) with an importance
  matrix (64 x 256 tokens of pydoc-calib), Q4_K_M both again with llama.cpp's search alone (``refine=False``), and
  Q4_K_M / Q3_K_M / Q2_K filled by GPTQ (``gptq=True``, the same calibration), each scored by llama.cpp
  (``llama-cpp-python``) and by us (``load_gguf``,
  our kernels; also the KL from the float model per token, steadier than perplexity this close to float);
- llama.cpp's own files of the same model: ``llama_model_quantize`` applied to our F32 export (llama.cpp's
  ``convert_hf_to_gguf.py`` is tried too when ``--llama-cpp-src`` points at a llama.cpp checkout), with the
  per-tensor types it chose compared with ours;
- a b1.58 model (pydoc-llama-6m converted by ``examples/bitnet_convert.py``, ``--bitnet-steps`` steps) as TQ2_0 and
  TQ1_0: our packed model, llama.cpp and ``load_gguf`` on the file;
- decode tokens/s at batch 1 (64 tokens after a 32-token prompt) in llama.cpp and in our ``load_gguf`` model for
  each file, measured alternately in the same run (ratio = ours / llama.cpp);
- ``load_gguf`` memory: parameter + buffer bytes against the file size, and transformers' own GGUF loader's.

    pip install -e ".[gguf]"                 # builds llama.cpp (10-25 min)
    python benchmarks/gguf.py                # ~15 min on 2 cores
    python benchmarks/gguf.py --quick        # smoke test: 2,000 tokens, 20 BitNet steps
"""

from __future__ import annotations

import argparse
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

_HERE = str(Path(__file__).resolve().parent)
sys.path.insert(0, _HERE)

import common  # noqa: E402

# This file's name shadows the gguf package while its folder is on sys.path: import common, then leave it.
sys.path[:] = [p for p in sys.path if p not in (_HERE, "")]
sys.path.insert(0, str(common.REPO_ROOT / "examples"))
CALIB = common.SHARED / "data" / "pydoc-calib.txt"
TYPES = ["Q8_0", "Q6_K", "Q5_K_M", "Q4_K_M", "Q3_K_M", "Q2_K"]
FTYPES = {"Q8_0": 7, "Q6_K": 18, "Q5_K_M": 17, "Q4_K_M": 15, "Q3_K_M": 12, "Q2_K": 10}  # llama_ftype


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--max-tokens", type=int, default=None, help="perplexity tokens (20000; 2000 with --quick)")
    p.add_argument("--bitnet-steps", type=int, default=None, help="b1.58 conversion steps (300; 20 with --quick)")
    p.add_argument("--llama-cpp-src", default=None, help="a llama.cpp checkout, to try its convert_hf_to_gguf.py")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--out", default=str(common.default_out("gguf")))
    a = p.parse_args(argv)
    a.max_tokens = a.max_tokens or (2000 if a.quick else 20000)
    a.bitnet_steps = a.bitnet_steps or (20 if a.quick else 300)
    return a


class LlamaCpp:
    """One llama.cpp model (llama-cpp-python) on a GGUF file."""

    def __init__(self, path: Path, threads: int):
        from llama_cpp import Llama

        with common.silence_fds():
            self.llm = Llama(model_path=str(path), n_ctx=512, logits_all=True, verbose=False, n_threads=threads,
                             n_threads_batch=threads, n_batch=512)

    def nll(self, windows) -> float:
        import numpy as np

        total, n = 0.0, 0
        for row in windows.tolist():
            self.llm.reset()
            self.llm.eval(row)
            logits = np.asarray(self.llm.scores[: len(row)], dtype=np.float64)
            logits -= logits.max(-1, keepdims=True)
            logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
            total -= float(logp[np.arange(len(row) - 1), row[1:]].sum())
            n += len(row) - 1
        return total / n

    def decode_tok_s(self, prompt: list[int], new_tokens: int = 64) -> float:
        self.llm.reset()
        self.llm.eval(prompt)
        tok = prompt[-1]
        start = time.perf_counter()
        for _ in range(new_tokens):
            self.llm.eval([tok])
            tok = int(self.llm.scores[self.llm.n_tokens - 1].argmax())
        return new_tokens / (time.perf_counter() - start)

    def tokenize(self, text: str) -> list[int]:
        return self.llm.tokenize(text.encode(), add_bos=False, special=False)

    def close(self):
        self.llm.close()


def our_nll(model, windows, reference=None) -> float | tuple[float, float]:
    """Mean next-token NLL of ``model`` on ``windows``; with a ``reference`` model also the mean KL(reference ‖ model)
    per token, a steadier measure of fidelity than perplexity near the float model's."""
    import torch

    total, kl, n = 0.0, 0.0, 0
    with torch.inference_mode():
        for start in range(0, windows.shape[0], 8):
            batch = windows[start : start + 8]
            logp = model(input_ids=batch, use_cache=False).logits.float().log_softmax(-1)
            total -= logp[:, :-1].gather(-1, batch[:, 1:, None]).sum().item()
            n += batch.shape[0] * (batch.shape[1] - 1)
            if reference is not None:
                ref = reference(input_ids=batch, use_cache=False).logits.float().log_softmax(-1)
                kl += (ref.exp() * (ref - logp)).sum().item()
    return total / n if reference is None else (total / n, kl / windows.numel())


def our_decode(model, tokenizer) -> float:
    from hf_compress.eval import tokens_per_second

    return tokens_per_second(model.eval(), tokenizer, prompt_len=32, new_tokens=64, prefill_len=64, repeats=3)["decode_tok_s"]


def tensor_types(path: Path) -> dict[str, str]:
    import gguf

    return {t.name: gguf.GGMLQuantizationType(t.tensor_type).name for t in gguf.GGUFReader(str(path)).tensors}


def state_bytes(model) -> int:
    seen, total = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        if t.data_ptr() in seen:
            continue
        seen.add(t.data_ptr())
        total += t.numel() * t.element_size()
    return total


def score_file(path: Path, windows, tokenizer, threads: int, prompt: list[int], sample: str, source_ids: list[int],
               reference) -> dict:
    """llama.cpp's and our perplexity, our KL to ``reference`` (the model the file was made from) and decode speed on
    one file."""
    from hf_compress import load_gguf

    row = {"bytes": path.stat().st_size}
    cpp = LlamaCpp(path, threads)
    row["llama.cpp tokenizes as source"] = cpp.tokenize(sample) == source_ids
    row["ppl llama.cpp"] = math.exp(cpp.nll(windows))
    ours, _ = load_gguf(path, tokenizer=tokenizer)
    nll, row["KL to source (ours)"] = our_nll(ours, windows, reference)
    row["ppl ours"] = math.exp(nll)
    row["ours / llama.cpp ppl"] = row["ppl ours"] / row["ppl llama.cpp"]
    a, b = [], []
    for _ in range(3):  # alternately, so that a change in load hits both
        a.append(cpp.decode_tok_s(prompt))
        b.append(our_decode(ours, tokenizer))
    row["llama.cpp tok/s"], row["ours tok/s"] = common.median(a), common.median(b)
    row["ours / llama.cpp speed"] = row["ours tok/s"] / row["llama.cpp tok/s"]
    row["load_gguf bytes / file"] = state_bytes(ours) / row["bytes"]
    cpp.close()
    return row


def llama_quantize(src: Path, dst: Path, ftype: int, threads: int) -> None:
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = ftype
    params.nthread = threads
    with common.silence_fds():
        rc = llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), params)
    if rc != 0:
        raise RuntimeError(f"llama_model_quantize returned {rc}")


def try_llama_convert(src_dir: str | None, out: Path) -> str:
    if not src_dir:
        return "not run (pass --llama-cpp-src)"
    script = Path(src_dir) / "convert_hf_to_gguf.py"
    proc = subprocess.run([sys.executable, str(script), str(common.PYDOC_MODEL), "--outtype", "f32", "--outfile", str(out)],
                          capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    if proc.returncode == 0 and out.is_file():
        return "converted"
    last = [line for line in proc.stderr.strip().splitlines() if line.strip()]
    return f"failed: {last[-1] if last else proc.returncode}"


def main(argv=None) -> int:
    args = parse_args(argv)
    threads = common.setup(args.threads)
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from hf_compress import compute_imatrix, export_gguf, load_gguf
    from hf_compress.eval.perplexity import tokenize_windows

    tok = AutoTokenizer.from_pretrained(common.PYDOC_MODEL)
    model = AutoModelForCausalLM.from_pretrained(common.PYDOC_MODEL).eval()
    windows = tokenize_windows(tok, common.HELDOUT.read_text(), seqlen=256, max_tokens=args.max_tokens)
    sample = "def parse(text):\n    \"\"\"Return the café's 12 items.\"\"\"\n    return [x for x in text.split()]  # naïve\n"
    source_ids = tok(sample)["input_ids"]
    prompt = windows[0, :32].tolist()
    float_ppl = math.exp(our_nll(model, windows))
    rows = [{"file": "float (transformers)", "ppl ours": float_ppl}]
    print(f"float ppl {float_ppl:.3f}", file=sys.stderr)
    result = {"environment": common.environment(), "settings": vars(args)}
    with tempfile.TemporaryDirectory() as tmpdir:
        tmp = Path(tmpdir)
        f32 = export_gguf(model, tok, tmp / "ours-F32.gguf", "F32")
        imatrix = compute_imatrix(model, tok, str(CALIB), n_samples=64, seqlen=256)
        files = [("ours F32", f32)]
        for q in TYPES:
            t0 = time.perf_counter()
            files.append((f"ours {q}", export_gguf(model, tok, tmp / f"ours-{q}.gguf", q)))
            print(f"exported {q} in {time.perf_counter() - t0:.1f}s", file=sys.stderr)
        files.append(("ours Q4_K_M + imatrix", export_gguf(model, tok, tmp / "ours-Q4_K_M-imat.gguf", "Q4_K_M", imatrix=imatrix)))
        for name, im in (("", None), (" + imatrix", imatrix)):  # the same without our refinement of ggml's search
            files.append((f"ours Q4_K_M{name}, llama.cpp's search only (refine=False)",
                          export_gguf(model, tok, tmp / f"ours-Q4_K_M{name.strip(' +')}-ggml.gguf", "Q4_K_M", imatrix=im, refine=False)))
        for q in ("Q4_K_M", "Q3_K_M", "Q2_K"):
            if q != "Q4_K_M":
                files.append((f"ours {q} + imatrix", export_gguf(model, tok, tmp / f"ours-{q}-imat.gguf", q, imatrix=imatrix)))
            files.append((f"ours {q} + GPTQ", export_gguf(model, tok, tmp / f"ours-{q}-gptq.gguf", q, imatrix=str(CALIB),
                                                          gptq=True, n_samples=64)))
        type_rows = []
        for q in TYPES:
            dst = tmp / f"llamacpp-{q}.gguf"
            llama_quantize(f32, dst, FTYPES[q], threads)
            files.append((f"llama.cpp {q} (llama_model_quantize of our F32)", dst))
            ours_t, theirs_t = tensor_types(tmp / f"ours-{q}.gguf"), tensor_types(dst)
            diff = {n: (ours_t.get(n), t) for n, t in theirs_t.items() if ours_t.get(n) != t}
            type_rows.append({"qtype": q, "tensors": len(theirs_t), "same type": len(theirs_t) - len(diff),
                              "differ": ", ".join(f"{n}: ours {a} / llama.cpp {b}" for n, (a, b) in sorted(diff.items())) or "none"})
        for name, path in files:
            t0 = time.perf_counter()
            row = {"file": name, **score_file(path, windows, tok, threads, prompt, sample, source_ids, model)}
            row["ppl ours / float"] = row["ppl ours"] / float_ppl
            row["ppl llama.cpp / float"] = row["ppl llama.cpp"] / float_ppl
            rows.append(row)
            print(f"{name}: llama.cpp {row['ppl llama.cpp']:.3f} ours {row['ppl ours']:.3f} ({time.perf_counter() - t0:.0f}s)",
                  file=sys.stderr)

        # transformers' own GGUF loader: memory and logits on the Q4_K_M file
        q4 = tmp / "ours-Q4_K_M.gguf"
        hf = AutoModelForCausalLM.from_pretrained(str(tmp), gguf_file=q4.name).eval()
        ours, _ = load_gguf(q4, tokenizer=tok)
        from hf_compress import kernels

        with torch.inference_mode(), kernels.use_backend("reference"):
            diff = (hf(windows[:1]).logits - ours(windows[:1]).logits).abs().max().item()
        memory = {"file bytes": q4.stat().st_size, "load_gguf bytes": state_bytes(ours), "transformers loader bytes": state_bytes(hf),
                  "max |logits load_gguf (reference kernels) - transformers loader|": diff}
        memory["load_gguf / file"] = memory["load_gguf bytes"] / memory["file bytes"]
        memory["transformers / file"] = memory["transformers loader bytes"] / memory["file bytes"]
        result["convert_hf_to_gguf"] = try_llama_convert(args.llama_cpp_src, tmp / "llamacpp-convert-f32.gguf")

        # b1.58
        import bitnet_convert

        conv = bitnet_convert.parse(["--method", "bitnet", "--bits", "1.58", "--steps", str(args.bitnet_steps), "--seed", "0"])
        bitnet, res = bitnet_convert.convert(conv, log=lambda r: None)
        bitnet.eval()
        tern_rows = [{"file": f"b1.58 packed model ({args.bitnet_steps} steps)", "ppl ours": math.exp(our_nll(bitnet, windows))}]
        for q in ("TQ2_0", "TQ1_0"):
            path = export_gguf(bitnet, tok, tmp / f"bitnet-{q}.gguf", q)
            tern_rows.append({"file": f"b1.58 {q}", **score_file(path, windows, tok, threads, prompt, sample, source_ids, bitnet)})
        for r in tern_rows[1:]:
            r["ppl ours / packed model"] = r["ppl ours"] / tern_rows[0]["ppl ours"]
            r["ppl llama.cpp / packed model"] = r["ppl llama.cpp"] / tern_rows[0]["ppl ours"]

    cols = ["file", "bytes", "ppl llama.cpp", "ppl ours", "ours / llama.cpp ppl", "ppl llama.cpp / float", "KL to source (ours)", "llama.cpp tok/s",
            "ours tok/s", "ours / llama.cpp speed", "load_gguf bytes / file", "llama.cpp tokenizes as source"]
    print("\n## Perplexity (pydoc-heldout), bytes and decode speed\n")
    print(common.markdown_table(rows, cols))
    print("\n## Per-tensor types: ours against llama_model_quantize's\n")
    print(common.markdown_table(type_rows, ["qtype", "tensors", "same type", "differ"]))
    print("\n## b1.58 model as TQ2_0 / TQ1_0\n")
    print(common.markdown_table(tern_rows, ["file", "bytes", "ppl llama.cpp", "ppl ours", "ppl ours / packed model", "KL to source (ours)",
                                            "ppl llama.cpp / packed model", "llama.cpp tok/s", "ours tok/s", "ours / llama.cpp speed"]))
    print("\n## load_gguf memory (Q4_K_M)\n")
    print(common.markdown_table([memory], list(memory)))
    print(f"\nllama.cpp's convert_hf_to_gguf.py on this model: {result['convert_hf_to_gguf']}")

    by = {r["file"]: r for r in rows}
    floors = [common.floor_row(f"llama.cpp vs ours, same file, worst |ppl ratio - 1| ({len(rows) - 1} files)",
                               max(abs(r["ours / llama.cpp ppl"] - 1) for r in rows[1:] + tern_rows[1:]), "<=", 0.005)]
    for q, limit in (("Q8_0", 1.002), ("Q6_K", 1.005), ("Q4_K_M", 1.03)):
        floors.append(common.floor_row(f"{q} ppl / float (llama.cpp on our file)", by[f"ours {q}"]["ppl llama.cpp / float"], "<=", limit))
    floors.append(common.floor_row("imatrix Q4_K_M / plain Q4_K_M ppl (llama.cpp)",
                                   by["ours Q4_K_M + imatrix"]["ppl llama.cpp"] / by["ours Q4_K_M"]["ppl llama.cpp"], "<=", 1.0))
    floors.append(common.floor_row("GPTQ Q4_K_M / llama.cpp's own Q4_K_M ppl (llama.cpp)",
                                   by["ours Q4_K_M + GPTQ"]["ppl llama.cpp"] / by["llama.cpp Q4_K_M (llama_model_quantize of our F32)"]["ppl llama.cpp"],
                                   "<=", 1.0))
    floors.append(common.floor_row("our Q4_K_M / llama.cpp's own Q4_K_M ppl (llama.cpp)",
                                   by["ours Q4_K_M"]["ppl llama.cpp"] / by["llama.cpp Q4_K_M (llama_model_quantize of our F32)"]["ppl llama.cpp"],
                                   "<=", 1.0))
    floors.append(common.floor_row("load_gguf bytes / Q4_K_M file", memory["load_gguf / file"], "<=", 1.3))
    floors.append(common.floor_row("load_gguf vs transformers loader, max |logit diff|", diff, "<=", 1e-3))
    print("\n## Floors\n")
    print(common.floors_table(floors))
    result.update({"rows": rows, "types": type_rows, "ternary": tern_rows, "memory": memory, "floors": floors,
                   "bitnet_conversion": res})
    out = common.write_json(args.out, result)
    print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
