"""Embedding cosine metric (``evaluate`` module): mean cosine similarity between paired embedding vectors.

Typical use: ``predictions`` = sentence embeddings of a compressed model, ``references`` = those of the
original model (see :func:`hf_compress.eval.embed`), one vector per sentence::

    import evaluate
    from hf_compress.eval import metric_path
    cos = evaluate.load(metric_path("embedding_cosine"))
    cos.compute(predictions=[[1.0, 0.0]], references=[[1.0, 1.0]])  # {"embedding_cosine": 0.7071..., ...}

Vectors need not be normalised. Computed in float64.
"""

import datasets
import evaluate

_DESCRIPTION = __doc__

_KWARGS_DESCRIPTION = """
Args:
    predictions (list of list of float): one embedding vector per example.
    references (list of list of float): the reference embedding for each example, same dimension.
    eps (float, 1e-12): guards the norms of zero vectors.
Returns:
    embedding_cosine (float): mean cosine similarity over the examples.
    min_cosine (float): the smallest one.
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class EmbeddingCosine(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="",
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {
                    "predictions": datasets.Sequence(datasets.Value("float64")),
                    "references": datasets.Sequence(datasets.Value("float64")),
                }
            ),
        )

    def _compute(self, predictions, references, eps=1e-12):
        import torch

        if len(predictions) == 0:
            raise ValueError("no embeddings to compare")
        a = torch.tensor([list(p) for p in predictions], dtype=torch.float64)
        b = torch.tensor([list(r) for r in references], dtype=torch.float64)
        if a.shape != b.shape:
            raise ValueError(f"predictions {tuple(a.shape)} and references {tuple(b.shape)} differ in shape")
        cos = torch.nn.functional.cosine_similarity(a, b, dim=1, eps=eps)
        return {"embedding_cosine": cos.mean().item(), "min_cosine": cos.min().item()}
