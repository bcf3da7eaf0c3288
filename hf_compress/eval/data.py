"""Loading evaluation text: whole files / datasets for perplexity, sentence lists for embedding evals."""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

from transformers.utils import logging

logger = logging.get_logger(__name__)

__all__ = ["load_text", "load_sentences", "resolve_text"]

_SUFFIX_RE = re.compile(r"\.[A-Za-z0-9]{1,8}$")


def _read_file(path: Path) -> str:
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"text file not found: {path}")
    return path.read_text(encoding="utf-8")


def _is_dataset(obj: Any) -> bool:
    try:
        import datasets
    except ImportError:  # pragma: no cover - datasets is a dependency
        return False
    return isinstance(obj, (datasets.Dataset, datasets.DatasetDict, datasets.IterableDataset))


def _dataset_text(ds: Any, text_column: str) -> str:
    import datasets

    if isinstance(ds, datasets.DatasetDict):
        raise TypeError(f"got a DatasetDict with splits {list(ds)}; pass one split, e.g. ds['test']")
    if isinstance(ds, datasets.IterableDataset):
        raise TypeError("streaming (Iterable) datasets are not supported: materialise the split first")
    if text_column not in ds.column_names:
        raise ValueError(f"dataset has no column {text_column!r} (columns: {ds.column_names}); pass text_column=...")
    return "\n\n".join(ds[text_column])


def load_text(source: str | os.PathLike | Any, *, text_column: str = "text") -> str:
    """The evaluation text behind ``source``.

    ``source`` is a path (``str`` or :class:`os.PathLike`) to a UTF-8 text file, read whole, or a
    ``datasets.Dataset`` whose ``text_column`` rows are joined with ``"\\n\\n"``. A ``str`` is always taken
    as a path here, never as the text itself; a missing file raises ``FileNotFoundError("text file not
    found: PATH")``. (To score a string of text with :func:`perplexity`, pass it directly or as ``[text]``.)
    """
    if _is_dataset(source):
        return _dataset_text(source, text_column)
    if isinstance(source, (str, os.PathLike)):
        return _read_file(Path(source))
    raise TypeError(f"load_text expects a path or a datasets.Dataset, got {type(source).__name__}")


def _looks_like_path(s: str) -> bool:
    return "\n" not in s and len(s) < 4096 and (os.sep in s or "/" in s or bool(_SUFFIX_RE.search(s.strip())))


def resolve_text(source: Any, *, text_column: str = "text") -> str:
    """Text from a path, a ``datasets.Dataset``, a list of strings (joined with ``"\\n\\n"``) or a raw string.

    A ``str`` names a file if that file exists, or if it looks like a path (one line, with a path separator or
    a file suffix such as ``.txt``) -- then a missing file is an error rather than being scored as text.
    """
    if isinstance(source, os.PathLike) or _is_dataset(source):
        return load_text(source, text_column=text_column)
    if isinstance(source, str):
        if "\n" not in source and len(source) < 4096 and os.path.isfile(os.path.expanduser(source)):
            return _read_file(Path(source))
        if _looks_like_path(source):
            raise FileNotFoundError(
                f"text file not found: {source} (to score this string itself as text, pass it as [text])"
            )
        return source
    if isinstance(source, (list, tuple)) and all(isinstance(s, str) for s in source):
        return "\n\n".join(source)
    raise TypeError(
        "expected a text file path, a datasets.Dataset, a list of strings or a string of text, "
        f"got {type(source).__name__}"
    )


# --- sentences for embedding evals ---------------------------------------------------------------------

_UNDERLINE_RE = re.compile(r"^([=\-~^\"'`#*+<>:._])\1{2,}\s*$")
_ROLE_RE = re.compile(r":[\w.+-]+(?::[\w.+-]+)*:`([^`]*)`")
_LITERAL_RE = re.compile(r"``([^`]*)``")
_LINK_RE = re.compile(r"`([^`<]*?)\s*(?:<[^>`]*>)?`_{1,2}")
_TARGET_RE = re.compile(r"<[^>`]*>")
_EMPH_RE = re.compile(r"\*{1,2}([^*\s][^*]*?)\*{1,2}")
_BULLET_RE = re.compile(r"^(?:[*+\-]|#\.|\d+\.|\(\d+\))\s+")
_SENT_SPLIT_RE = re.compile(r"(?<=[.!?])\s+(?=[\"'(\[]?[A-Z0-9])")
_WS_RE = re.compile(r"\s+")


def _strip_markup(s: str) -> str:
    def role(m: re.Match) -> str:
        inner = _TARGET_RE.sub("", m.group(1)).strip()
        return inner.lstrip("~!")

    s = _ROLE_RE.sub(role, s)
    s = _LITERAL_RE.sub(r"\1", s)
    s = _LINK_RE.sub(r"\1", s)
    s = _EMPH_RE.sub(r"\1", s)
    s = s.replace("`", "")
    return _WS_RE.sub(" ", s).strip()


def _paragraphs(text: str):
    """Prose paragraphs of a (reStructuredText-ish) document, skipping headings, directives and literal blocks."""
    block: list[str] = []
    literal_indent: int | None = None  # indentation of the paragraph that opened a "::" literal block

    def indent(line: str) -> int:
        return len(line) - len(line.lstrip(" \t"))

    def flush():
        nonlocal literal_indent
        if not block:
            return None
        first = block[0]
        ind = indent(first)
        if literal_indent is not None:
            if ind > literal_indent:
                return None  # still inside the literal block
            literal_indent = None
        stripped = first.strip()
        is_directive = stripped.startswith("..")
        opens_literal = not is_directive and block[-1].rstrip().endswith("::")
        if opens_literal:
            literal_indent = ind
        if is_directive or stripped.startswith((">>>", "|", "+-", "=", "$ ", "%")):
            return None
        lines = [ln.strip() for ln in block if not _UNDERLINE_RE.match(ln.strip())]
        if len(lines) < len(block) and len(lines) <= 1:
            return None  # a heading
        para = " ".join(lines)
        para = _BULLET_RE.sub("", para)
        if opens_literal:  # reST: "text::" renders as "text:", "text ::" as "text"
            para = para.rstrip()[:-2]
            para = para.rstrip() if para.endswith((" ", "\t")) or not para else para + ":"
        return para

    for line in text.splitlines():
        if line.strip():
            block.append(line.rstrip())
            continue
        para = flush()
        block = []
        if para:
            yield para
    para = flush()
    if para:
        yield para


def _good_sentence(s: str, min_chars: int, max_chars: int) -> bool:
    if not (min_chars <= len(s) <= max_chars):
        return False
    if not s[0].isupper() and not s[0].isdigit():
        return False
    letters = sum(c.isalpha() for c in s)
    spaces = s.count(" ")
    if letters < 0.65 * len(s) or spaces < 2:
        return False
    return not any(tok in s for tok in ("::", "=>", "{", "}", ";", "\\", "__"))


def load_sentences(
    path_or_text: str | os.PathLike | Any,
    n: int = 200,
    min_chars: int = 20,
    max_chars: int = 300,
    *,
    text_column: str = "text",
) -> list[str]:
    """Up to ``n`` sentence-like strings from a text file (or a string of text, a list of strings, a Dataset).

    Prose paragraphs are split into sentences, light reStructuredText markup is stripped, sentences of
    ``min_chars``..``max_chars`` characters that look like prose are kept (first occurrence only), and ``n``
    of them are picked evenly spaced over the document. Deterministic: same input, same list.
    """
    if n <= 0:
        raise ValueError(f"n must be positive, got {n}")
    if isinstance(path_or_text, (list, tuple)):
        text = "\n\n".join(path_or_text)
    else:
        text = resolve_text(path_or_text, text_column=text_column)
    seen: set[str] = set()
    sentences: list[str] = []
    for para in _paragraphs(text):
        for sent in _SENT_SPLIT_RE.split(_strip_markup(para)):
            sent = sent.strip()
            if sent in seen or not _good_sentence(sent, min_chars, max_chars):
                continue
            seen.add(sent)
            sentences.append(sent)
    if not sentences:
        raise ValueError(f"no sentence of {min_chars}-{max_chars} characters found in the text")
    if len(sentences) < n:
        logger.warning(
            "only %d sentences of %d-%d characters found (asked for %d)", len(sentences), min_chars, max_chars, n
        )
        return sentences
    step = len(sentences) / n
    return [sentences[int(i * step)] for i in range(n)]
