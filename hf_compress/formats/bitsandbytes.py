"""bitsandbytes' LLM.int8 checkpoint format (``quant_method: bitsandbytes``, ``load_in_8bit``), both ways.

- :func:`load_bitsandbytes_int8` loads an 8-bit bitsandbytes checkpoint onto our :class:`Int8MixedLinear`
  layers, on CPU, without bitsandbytes.
- :func:`export_bitsandbytes` rewrites one of our ``hf_compress_int8`` folders as that checkpoint, so a user
  with a GPU and bitsandbytes loads it with a plain ``from_pretrained``.

The format, per quantized linear ``name`` (``O`` outputs, ``I`` inputs), as ``Linear8bitLt`` saves it:

* ``name.weight`` int8 ``[O, I]``: row-wise absmax codes ``round(W * 127 / absmax_row)``;
* ``name.SCB`` float32 ``[O]``: each row's absmax, so ``W ~= weight * SCB / 127``;
* ``name.weight_format`` uint8, 0-d: the layout of ``weight`` (bitsandbytes'
  ``LINEAR_8BIT_WEIGHTS_FORMAT_MAPPING``: 0 row, 1 col32, 2 col_turing, 3 col_ampere). bitsandbytes >= 0.45
  writes and reads only 0 (row-major); the others are GPU-tiled layouts of older versions. A missing
  ``weight_format`` means row, as in bitsandbytes;
* ``name.bias`` in float.

Our own int8 folders hold exactly ``weight`` and ``SCB`` with the same meaning: the two formats differ by the
``weight_format`` tensors and the config. transformers' bnb 8-bit loader reads ``weight``, ``SCB`` and
``weight_format`` (``Bnb8BitHfQuantizer.serialized_names``) and, from the config, ``load_in_8bit``,
``llm_int8_threshold``, ``llm_int8_skip_modules`` and ``llm_int8_has_fp16_weight``. An explicit
``llm_int8_skip_modules`` list *replaces* its default skips (output embeddings, tied weights), while our
``modules_to_not_convert`` adds to them: the export writes the full list when ours is set.

Both directions read and write safetensors and JSON only.
"""

from __future__ import annotations

import copy
import json
import shutil
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from transformers.utils import logging

from ..integrations.config import Int8MixedConfig, W8A8Config
from ..integrations.loading import is_causal_lm
from ..integrations.modules import linear_shape
from ..integrations.quantizer import safetensors_header
from ..integrations.save import atomic_dir
from .gptq import _local_folder, _safetensors_files

logger = logging.get_logger(__name__)

# bitsandbytes.utils.LINEAR_8BIT_WEIGHTS_FORMAT_MAPPING, inverted.
WEIGHT_FORMATS = {0: "row", 1: "col32", 2: "col_turing", 3: "col_ampere"}
ROW = 0
INDEX_FILE = "model.safetensors.index.json"
FLOAT_DTYPES = ("F16", "BF16", "F32", "F64")
_OTHER_EXPORTS = {
    "hf_compress_rtn": "it is a weight-only RTN folder: export it with --format gptq",
    "hf_compress_gptq": "it is a weight-only GPTQ folder: export it with --format gptq",
    "hf_compress_w8a8": (
        "it is a W8A8 folder (int8 activations without LLM.int8's float outlier columns; static scales and "
        "SmoothQuant factors have no bitsandbytes equivalent): re-quantize the float model with --method llm-int8 "
        "(Int8MixedConfig) to export it"
    ),
    "bitsandbytes": "it is already a bitsandbytes checkpoint",
    "gptq": "it is a GPTQ checkpoint: load it with hf_compress.load_gptq",
}


# -- the config ----------------------------------------------------------------------------------------------
def bnb_int8_config_dict(threshold: float, skip_modules: list[str] | None) -> dict:
    """The complete ``quantization_config`` transformers writes for ``BitsAndBytesConfig(load_in_8bit=True)``
    (its ``to_dict()``: the private ``_load_in_*`` copies included), with our threshold and skips."""
    return {
        "quant_method": "bitsandbytes",
        "_load_in_8bit": True,
        "_load_in_4bit": False,
        "llm_int8_threshold": float(threshold),
        "llm_int8_skip_modules": None if skip_modules is None else list(skip_modules),
        "llm_int8_enable_fp32_cpu_offload": False,
        "llm_int8_has_fp16_weight": False,
        "bnb_4bit_quant_type": "fp4",
        "bnb_4bit_use_double_quant": False,
        "bnb_4bit_compute_dtype": "float32",
        "bnb_4bit_quant_storage": "uint8",
        "load_in_4bit": False,
        "load_in_8bit": True,
    }


def _flag(qc: dict, name: str) -> bool:
    return bool(qc.get(name, qc.get(f"_{name}", False)))


def config_from_bnb(qc: dict) -> Int8MixedConfig | W8A8Config:
    """Our config for a ``quant_method: bitsandbytes`` 8-bit config dict: :class:`Int8MixedConfig` with its
    threshold and skips (a threshold <= 0, bitsandbytes' "no outlier columns", is dynamic per-token W8A8)."""
    method = qc.get("quant_method")
    method = getattr(method, "value", method)
    if method != "bitsandbytes":
        hint = _OTHER_EXPORTS.get(method, "")
        if method and str(method).startswith("hf_compress_"):
            hint = "it is an hf_compress folder: load it with from_pretrained after import hf_compress"
        raise ValueError(
            f"not a bitsandbytes checkpoint: its quantization_config has quant_method {method!r}; "
            f"load_bitsandbytes_int8 reads quant_method 'bitsandbytes' with load_in_8bit{f' ({hint})' if hint else ''}"
        )
    if _flag(qc, "load_in_4bit"):
        raise ValueError(
            f"4-bit bitsandbytes checkpoints are not supported: this one is load_in_4bit "
            f"(bnb_4bit_quant_type {qc.get('bnb_4bit_quant_type', 'fp4')!r}); load_bitsandbytes_int8 reads 8-bit "
            "(LLM.int8, load_in_8bit) checkpoints only. Load it with bitsandbytes on a GPU, or re-quantize the float "
            "model with hf_compress (e.g. Int8MixedConfig, or RTNConfig/GPTQConfig for 4 bits)"
        )
    if not _flag(qc, "load_in_8bit"):
        raise ValueError("the bitsandbytes quantization_config has neither load_in_8bit nor load_in_4bit set: not a quantized checkpoint")
    if qc.get("llm_int8_has_fp16_weight"):
        raise ValueError(
            "llm_int8_has_fp16_weight=True checkpoints (bitsandbytes' 8-bit training mode) store float weights, not "
            "int8 codes and SCB: remove quantization_config from config.json and quantize the float weights with "
            "hf_compress.Int8MixedConfig instead"
        )
    threshold = qc.get("llm_int8_threshold", 6.0)
    skip = qc.get("llm_int8_skip_modules")
    if isinstance(skip, str):
        skip = [skip]
    if skip is not None:
        skip = list(skip)
    if not isinstance(threshold, (int, float)) or isinstance(threshold, bool):
        raise ValueError(f"llm_int8_threshold must be a number, got {threshold!r}")
    if threshold <= 0:  # bitsandbytes quantizes every activation column to int8, per token: dynamic W8A8
        return W8A8Config(mode="dynamic", act_granularity="per-token", modules_to_not_convert=skip)
    return Int8MixedConfig(threshold=float(threshold), modules_to_not_convert=skip)


# -- the tensors ---------------------------------------------------------------------------------------------
def _headers(files: list[Path]) -> dict[str, tuple[list[int], str, Path]]:
    """``{tensor: (shape, safetensors dtype, file)}`` over every shard, from the headers only."""
    out = {}
    for f in files:
        for name, (shape, dtype) in safetensors_header(str(f)).items():
            out[name] = (shape, dtype, f)
    return out


def check_int8_tensors(header: dict, where: str) -> list[str]:
    """The quantized linears (names with an ``SCB``), after checking ``weight``/``SCB`` shapes and dtypes from
    the headers alone (no tensor data is read)."""
    names = sorted(k[: -len(".SCB")] for k in header if k.endswith(".SCB"))
    if not names:
        raise ValueError(f"{where} holds no '.SCB' tensors: no layer is stored in LLM.int8 (int8 weight + SCB) format")
    fix = (
        "the checkpoint is corrupt or was not written in bitsandbytes' row-wise LLM.int8 layout; re-save it from the "
        "bitsandbytes model (save_pretrained) or re-export it (hf-compress export --format bitsandbytes)"
    )
    for name in names:
        scb_shape, scb_dtype = header[f"{name}.SCB"][:2]
        weight = header.get(f"{name}.weight")
        if weight is None:
            raise ValueError(f"{where} has {name}.SCB but no {name}.weight: {fix}")
        w_shape, w_dtype = weight[:2]
        if w_dtype != "I8" or len(w_shape) != 2:
            raise ValueError(
                f"{name}.weight is {w_dtype} {list(w_shape)} but has an SCB: an LLM.int8 weight is int8 [out, in] "
                f"(llm_int8_has_fp16_weight checkpoints, which keep float weights, are not supported); {fix}"
            )
        if list(scb_shape) != [w_shape[0]]:
            raise ValueError(
                f"{name}.SCB has shape {list(scb_shape)} but {name}.weight has shape {list(w_shape)}: SCB holds one "
                f"absmax per weight row, so it must be [{w_shape[0]}]; {fix}"
            )
        if scb_dtype not in FLOAT_DTYPES:
            raise ValueError(f"{name}.SCB is {scb_dtype}: it must be float (float32 as bitsandbytes writes it); {fix}")
    return names


def check_weight_formats(header: dict) -> None:
    """Every ``weight_format`` must be 0 (row-major): reads only those 0-d tensors."""
    by_file: dict[Path, list[str]] = {}
    for key, (_, _, f) in header.items():
        if key.endswith(".weight_format"):
            by_file.setdefault(f, []).append(key)
    for f, keys in by_file.items():
        with safe_open(str(f), "pt") as fh:
            for key in sorted(keys):
                t = fh.get_tensor(key)
                layer = key[: -len(".weight_format")]
                if t.numel() != 1 or t.dtype.is_floating_point:
                    raise ValueError(f"{key} must be a 0-d integer tensor (bitsandbytes' weight layout code), got {t.dtype} {list(t.shape)}")
                value = int(t.reshape(()).item())
                if value != ROW:
                    name = WEIGHT_FORMATS.get(value, "unknown")
                    raise ValueError(
                        f"layer {layer} has weight_format {value} ({name!r}): only the row-major layout (0, 'row') is "
                        f"supported. Formats {dict(WEIGHT_FORMATS)} 1-3 are GPU-tiled layouts written by bitsandbytes "
                        "< 0.45 after a forward pass; re-save the model with a bitsandbytes version that converts it back "
                        "to row-major (current versions write weight_format 0)"
                    )


# -- the model skeleton: which linears each side converts ----------------------------------------------------
def _concrete_class(config, model_class):
    """The ``PreTrainedModel`` subclass ``model_class.from_pretrained`` builds for ``config`` (None if unknown)."""
    mapping = getattr(model_class, "_model_mapping", None)
    if mapping is None:
        return model_class
    try:
        from transformers.models.auto.auto_factory import _get_model_class

        return _get_model_class(config, mapping)
    except Exception:  # custom code (auto_map) or an unknown config type
        return None


def _skeleton(config, cls):
    """A weightless (meta) instance of ``cls`` for ``config``, or None if it cannot be built."""
    if cls is None:
        return None
    cfg = copy.deepcopy(config)
    if hasattr(cfg, "quantization_config"):
        del cfg.quantization_config
    try:
        with torch.device("meta"):
            return cls._from_config(cfg)
    except Exception as e:  # noqa: BLE001 - only an optimization of the skip list; fall back to the tensors
        logger.warning("could not build %s on the meta device (%s): using the skip list as written", cls.__name__, e)
        return None


def _linear_names(model) -> list[str]:
    return [n for n, m in model.named_modules() if linear_shape(m) is not None]


def _stored_name(name: str, model, names: set[str]) -> str | None:
    for key in (name, f"{model.base_model_prefix}.{name}"):
        if key in names:
            return key
    return None


def _load_skip_list(skel, skip: list[str] | None, quantized: set[str], header: dict) -> list[str] | None:
    """Our ``modules_to_not_convert`` for the checkpoint: its skips, plus any linear we would quantize that it
    stores in float. Refuses a checkpoint that stores in int8 a layer we always keep in float."""
    from transformers.quantizers.base import HfQuantizer
    from transformers.quantizers.quantizers_utils import should_convert_module

    ours = HfQuantizer.get_modules_to_not_convert(skel, skip, skel._keep_in_fp32_modules, add_default_skips=True)
    added, refused = [], []
    for name in _linear_names(skel):
        convert = should_convert_module(name, ours)
        stored_q = _stored_name(name, skel, quantized)
        stored_w = _stored_name(f"{name}.weight", skel, set(header))
        if convert and stored_q is None and stored_w is not None and header[stored_w][1] in FLOAT_DTYPES:
            added.append(name)
        elif not convert and stored_q is not None:
            refused.append(name)
    if refused:
        raise ValueError(
            f"the checkpoint stores {refused} in int8, but hf_compress keeps these in float (output embeddings, tied "
            "weights, modules the model keeps in float32, or listed in llm_int8_skip_modules): load_bitsandbytes_int8 "
            "cannot load them; re-quantize the float model with hf_compress.Int8MixedConfig instead"
        )
    if added:
        logger.info("keeping %d linears the checkpoint stores in float: %s", len(added), added)
    if skip is None and not added:
        return None
    return sorted(set(skip or []) | set(added))


def _export_skip_list(skel, ours: list[str] | None, quantized: set[str], header: dict) -> list[str] | None:
    """``llm_int8_skip_modules`` making bitsandbytes convert exactly our quantized linears. ``None`` keeps its
    defaults, which are ours (output embeddings and tied weights, plus the model's fp32 modules); an explicit
    list replaces them in bitsandbytes, so it must name every linear we kept in float."""
    if ours is None:
        return None
    kept = set(ours)
    if skel is not None:
        kept |= {n for n in _linear_names(skel) if _stored_name(n, skel, quantized) is None}
    else:  # no model class: every module whose 2-D weight is stored in float (covers an untied lm_head)
        kept |= {k[: -len(".weight")] for k, (shape, dtype, _) in header.items()
                 if k.endswith(".weight") and len(shape) == 2 and dtype in FLOAT_DTYPES}
        logger.warning(
            "could not build the model to list its float linears: llm_int8_skip_modules=%s; add the output "
            "embeddings if they are tied to the input embeddings", sorted(kept),
        )
    return sorted(kept)


@contextmanager
def _ignoring_weight_format(cls):
    """Make ``cls.from_pretrained`` ignore the ``*.weight_format`` tensors (checked already; our layers have no
    use for them) instead of reporting them as unexpected keys."""
    if cls is None:
        yield
        return
    pattern = r"\.weight_format$"
    missing = object()
    old = cls.__dict__.get("_keys_to_ignore_on_load_unexpected", missing)
    inherited = list(getattr(cls, "_keys_to_ignore_on_load_unexpected", None) or [])
    cls._keys_to_ignore_on_load_unexpected = [*inherited, pattern]
    try:
        yield
    finally:
        if old is missing:
            del cls._keys_to_ignore_on_load_unexpected
        else:
            cls._keys_to_ignore_on_load_unexpected = old


# -- loading -------------------------------------------------------------------------------------------------
def load_bitsandbytes_int8(path_or_id: str, model_class=None, **from_pretrained_kwargs):
    """Load a bitsandbytes 8-bit checkpoint (``quant_method: bitsandbytes``, ``load_in_8bit``) onto
    :class:`~hf_compress.Int8MixedLinear` layers: CPU or GPU, no bitsandbytes needed.

    ``llm_int8_threshold`` becomes the layers' outlier threshold and ``llm_int8_skip_modules`` the modules
    kept in float. ``model_class`` defaults to ``AutoModelForCausalLM`` for causal LMs, else ``AutoModel``;
    other keyword arguments go to ``from_pretrained`` (``device_map``, ``dtype``...). The loaded model saves
    as an hf_compress folder; :func:`export_bitsandbytes` writes it back in this format.
    """
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

    folder = _local_folder(path_or_id)
    config = AutoConfig.from_pretrained(folder)
    qc = getattr(config, "quantization_config", None)
    if qc is None:
        raise ValueError(
            f"{path_or_id} has no quantization_config: it is not a bitsandbytes checkpoint (quant_method "
            "'bitsandbytes', load_in_8bit); to quantize a float model use from_pretrained(..., "
            "quantization_config=hf_compress.Int8MixedConfig())"
        )
    qc = qc if isinstance(qc, dict) else qc.to_dict()
    ours = config_from_bnb(qc)
    header = _headers(_safetensors_files(folder))
    quantized = set(check_int8_tensors(header, str(path_or_id)))
    check_weight_formats(header)

    model_class = model_class or (AutoModelForCausalLM if is_causal_lm(config) else AutoModel)
    cls = _concrete_class(config, model_class)
    skel = _skeleton(config, cls)
    if skel is not None:
        ours.modules_to_not_convert = _load_skip_list(skel, ours.modules_to_not_convert, quantized, header)
    config.quantization_config = ours.to_dict()
    from_pretrained_kwargs.pop("quantization_config", None)
    with _ignoring_weight_format(cls):
        return model_class.from_pretrained(folder, config=config, **from_pretrained_kwargs)


# -- export --------------------------------------------------------------------------------------------------
def _our_int8_config(src: Path, config: dict) -> Int8MixedConfig:
    qc = config.get("quantization_config")
    if not qc:
        raise ValueError(
            f"{src} is not quantized (its config.json has no quantization_config): quantize it first, e.g. "
            f"hf-compress quantize {src} --method llm-int8 --output DIR, then export DIR"
        )
    method = qc.get("quant_method")
    if method != Int8MixedConfig.quant_method:
        why = _OTHER_EXPORTS.get(method, "export --format bitsandbytes reads LLM.int8 folders only")
        raise ValueError(
            f"{src} is not an hf_compress LLM.int8 folder (quant_method {method!r}, expected "
            f"{Int8MixedConfig.quant_method!r}): {why}"
        )
    return Int8MixedConfig.from_dict(qc)


def export_bitsandbytes(src, dst) -> Path:
    """Rewrite an hf_compress LLM.int8 folder ``src`` (``quant_method: hf_compress_int8``) as a bitsandbytes 8-bit
    checkpoint in ``dst`` (written atomically): the same ``weight``/``SCB`` tensors, a ``weight_format`` (0, row)
    per quantized linear and a ``BitsAndBytesConfig(load_in_8bit=True)`` config with our threshold and skips.
    Tokenizer, generation config and other files are copied."""
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

    src = Path(src)
    if not src.is_dir():
        raise FileNotFoundError(f"{src} does not exist: pass a folder written by hf-compress quantize --method llm-int8 / save_pretrained")
    if not (src / "config.json").is_file():
        raise FileNotFoundError(f"{src} has no config.json: pass a folder written by hf-compress quantize --method llm-int8 / save_pretrained")
    if Path(dst).resolve() == src.resolve():
        raise ValueError(f"--output must differ from the source folder {src}")
    config = json.loads((src / "config.json").read_text())
    ours = _our_int8_config(src, config)
    files = _safetensors_files(src)
    header = _headers(files)
    quantized = check_int8_tensors(header, str(src))

    hf_config = AutoConfig.from_pretrained(src)
    model_class = AutoModelForCausalLM if is_causal_lm(hf_config) else AutoModel
    skel = _skeleton(hf_config, _concrete_class(hf_config, model_class))
    skip = _export_skip_list(skel, ours.modules_to_not_convert, set(quantized), header)

    added: dict[str, str] = {}  # new tensor -> its shard
    with atomic_dir(dst) as tmp:
        for f in files:
            tensors = {}
            with safe_open(str(f), "pt") as fh:
                metadata = fh.metadata()
                for key in fh.keys():
                    tensors[key] = fh.get_tensor(key)
            for name in quantized:  # save_pretrained may put a weight and its SCB in different shards
                if f"{name}.SCB" in tensors:
                    tensors[f"{name}.SCB"] = tensors[f"{name}.SCB"].to(torch.float32)
                if f"{name}.weight" in tensors:  # the layout code goes with the weight it describes
                    tensors[f"{name}.weight_format"] = torch.tensor(ROW, dtype=torch.uint8)
                    added[f"{name}.weight_format"] = f.name
            save_file(tensors, str(tmp / f.name), metadata=metadata or {"format": "pt"})
        for p in src.iterdir():  # tokenizer, generation config, model card...
            if p.is_file() and p.suffix != ".safetensors" and p.name not in ("config.json", INDEX_FILE):
                shutil.copy2(p, tmp / p.name)
        if (src / INDEX_FILE).is_file():
            index = json.loads((src / INDEX_FILE).read_text())
            index.setdefault("weight_map", {}).update(added)
            if isinstance(index.get("metadata", {}).get("total_size"), int):
                index["metadata"]["total_size"] += len(added)  # one uint8 each
            (tmp / INDEX_FILE).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
        config["quantization_config"] = bnb_int8_config_dict(ours.threshold, skip)
        (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    logger.info("exported %s as a bitsandbytes 8-bit checkpoint to %s (%d quantized linears)", src, dst, len(quantized))
    return Path(dst)
