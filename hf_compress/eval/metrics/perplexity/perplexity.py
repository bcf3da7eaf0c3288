"""Perplexity measurement (``evaluate`` module) wrapping :func:`hf_compress.eval.perplexity`.

Load it from its folder, with no Hub access::

    import evaluate
    from hf_compress.eval import metric_path
    ppl = evaluate.load(metric_path("perplexity"))
    ppl.compute(data=["some text", "more text"], model_id="/path/to/model")

``data`` (list of strings) is joined with ``"\\n\\n"`` into one text and scored in the project's convention:
tokenized whole, first ``max_tokens`` tokens, non-overlapping ``seqlen``-token windows, exp of the mean NLL
over all predicted tokens. ``model_id`` is a local folder (a model saved with hf_compress quantization is
fine: importing hf_compress registers the quantizers); ``model=``/``tokenizer=`` objects may be passed instead.
"""

import importlib

import datasets
import evaluate

_DESCRIPTION = __doc__

_KWARGS_DESCRIPTION = """
Args:
    data (list of str): the texts, joined with a blank line into one evaluation text.
    model_id (str): path of a causal LM folder (or Hub id, when online). Ignored if ``model`` is given.
    seqlen (int, 256), max_tokens (int or None, 20000), batch_size (int, 8): windowing, see hf_compress.eval.
    dtype (str, "float32"): dtype to load ``model_id`` in. device (str, None): where to run (default: cpu).
    model, tokenizer: an already loaded model and tokenizer (instead of ``model_id``).
Returns:
    perplexity (float), nll (float, mean NLL per predicted token), n_tokens (int, predicted tokens),
    n_windows (int).
"""


def _hf_eval():
    try:
        return importlib.import_module("hf_compress.eval")
    except ImportError as e:
        raise ImportError(
            "the perplexity module needs the hf_compress package importable (pip install -e <repo>)"
        ) from e


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class Perplexity(evaluate.Measurement):
    def _info(self):
        return evaluate.MeasurementInfo(
            module_type="measurement",
            description=_DESCRIPTION,
            citation="",
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features({"data": datasets.Value("string")}),
        )

    def _compute(
        self,
        data,
        model_id=None,
        seqlen=256,
        max_tokens=20000,
        batch_size=8,
        dtype="float32",
        device=None,
        model=None,
        tokenizer=None,
        progress=False,
    ):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        hf_eval = _hf_eval()
        if model is None:
            if model_id is None:
                raise ValueError("pass model_id (a model folder) or model= and tokenizer=")
            model = AutoModelForCausalLM.from_pretrained(model_id, dtype=getattr(torch, dtype))
            if device is not None:
                model = model.to(device)
        if tokenizer is None:
            if model_id is None:
                raise ValueError("pass tokenizer= along with model=")
            tokenizer = AutoTokenizer.from_pretrained(model_id)
        stats = hf_eval.perplexity_stats(
            model,
            tokenizer,
            list(data),
            seqlen=seqlen,
            max_tokens=max_tokens,
            batch_size=batch_size,
            progress=progress,
        )
        return {k: stats[k] for k in ("perplexity", "nll", "n_tokens", "n_windows")}
