"""The LLM2Vec teacher builder: MNTP masking and loss, SimCSE loss, both steps end to end on the
tiny LLM (no Ray), resuming mid-step, and the output loading through ``teacher.kind: llm2vec``."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from l2vg_ray.llm2vec import steps
from l2vg_ray.llm2vec.run import (
    CHECKPOINT_FILE,
    CORPUS_FILE,
    DONE_FILE,
    PhaseTrainer,
    WorkerArgs,
    batch_texts,
    train_phase,
)

TEXTS = [f"Text number {i} says something about topic {i % 7} and more." for i in range(40)]


def _cfg(tiny_config):
    """The typed llm2vec section (what the workers get), sized for the tiny LLM; LoRA dropout
    off so that runs are deterministic."""
    from l2vg_ray.config import typed

    x = typed(tiny_config).llm2vec
    x.max_length, x.lora_r, x.lora_alpha, x.lora_dropout = 24, 4, 8, 0.0
    x.mntp.steps, x.mntp.batch_size, x.simcse.steps, x.simcse.batch_size = 4, 4, 3, 4
    x.warmup_steps, x.log_every, x.checkpoint_every = 1, 1, 2
    return x


def _write_corpus(folder, texts=TEXTS):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / CORPUS_FILE).write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))


def _batch(tiny_llm_dir, texts):
    tok = steps.tokenizer_for(str(tiny_llm_dir))
    return tok, steps.tokenize(tok, texts, 24)


def test_mntp_masking_chooses_real_non_first_tokens_only(tiny_llm_dir):
    tok, batch = _batch(tiny_llm_dir, ["a b c d e f g h", "short", "one two three four five"])
    g = torch.Generator().manual_seed(0)
    ids, labels = steps.mask_for_mntp(batch, mask_id=66, vocab_size=len(tok), prob=0.3, generator=g)
    chosen = labels != -100
    real = batch["attention_mask"].bool()
    assert chosen.any(dim=1).all()  # every text with a candidate gets at least one
    assert not (chosen & ~real).any() and not (chosen & batch["special_tokens_mask"].bool()).any()
    first_real = real.int().argmax(dim=1)
    assert not chosen[torch.arange(len(ids)), first_real].any()
    assert (labels[chosen] == batch["input_ids"][chosen]).all()
    assert (ids[~chosen] == batch["input_ids"][~chosen]).all()  # nothing else changes


def test_mntp_masking_proportions():
    n = 20000
    batch = {"input_ids": torch.full((1, n), 7), "attention_mask": torch.ones(1, n, dtype=torch.long),
             "special_tokens_mask": torch.zeros(1, n, dtype=torch.long)}
    ids, labels = steps.mask_for_mntp(batch, mask_id=3, vocab_size=500, prob=0.2,
                                      generator=torch.Generator().manual_seed(1))
    chosen = labels != -100
    assert abs(chosen.float().mean().item() - 0.2) < 0.01
    assert abs((ids[chosen] == 3).float().mean().item() - 0.8) < 0.02


def test_mntp_loss_scores_each_masked_token_from_the_state_before_it(tiny_llm_dir, tiny_config):
    x = _cfg(tiny_config)
    model, head = steps.mntp_model(str(tiny_llm_dir), x)
    model.eval()
    tok, batch = _batch(tiny_llm_dir, ["one two three four five six"])
    labels = torch.full_like(batch["input_ids"], -100)
    labels[0, 3] = batch["input_ids"][0, 3]
    loss = steps.mntp_loss(model, head, batch["input_ids"], batch["attention_mask"], labels)
    with torch.no_grad():
        hidden = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
        by_hand = torch.nn.functional.cross_entropy(head(hidden[0, 2:3]), labels[0, 3:4])
    torch.testing.assert_close(loss.detach(), by_hand)


def test_simcse_loss_is_cross_entropy_of_scaled_cosines(tiny_llm_dir, tiny_config):
    x = _cfg(tiny_config)
    model, _ = steps.mntp_model(str(tiny_llm_dir), x)
    model.eval()  # no dropout: both readings equal
    _, batch = _batch(tiny_llm_dir, ["alpha beta", "gamma delta epsilon", "zeta"])
    loss = steps.simcse_loss(model, batch["input_ids"], batch["attention_mask"], 0.05)
    with torch.no_grad():
        e = torch.nn.functional.normalize(
            steps.mean_embeddings(model, batch["input_ids"], batch["attention_mask"]), dim=-1)
    expected = torch.nn.functional.cross_entropy(e @ e.T / 0.05, torch.arange(3))
    torch.testing.assert_close(loss.detach(), expected, rtol=1e-4, atol=1e-5)


def test_batches_are_a_seeded_permutation_per_pass():
    texts = [str(i) for i in range(10)]
    first_pass = [t for s in range(2) for t in batch_texts(texts, s, 5, seed=3)]
    assert sorted(first_pass) == texts
    assert batch_texts(texts, 4, 5, seed=3) == batch_texts(texts, 4, 5, seed=3)
    halves = batch_texts(texts, 1, 4, 3, rank=0, world=2) + batch_texts(texts, 1, 4, 3, rank=1, world=2)
    assert sorted(halves) == sorted(batch_texts(texts, 1, 4, seed=3))


def test_both_steps_write_what_the_llm2vec_teacher_loads(tiny_llm_dir, tiny_config, tmp_path):
    from l2vg_ray.generate.teacher import build_teacher

    x = _cfg(tiny_config)
    out = tmp_path / "llm2vec"
    _write_corpus(out)
    for phase in ("mntp", "simcse"):
        train_phase(WorkerArgs(cfg=x, llm=str(tiny_llm_dir), base_path=str(tiny_llm_dir),
                               output_dir=str(out), phase=phase))
        assert (out / phase / DONE_FILE).is_file() and not (out / phase / CHECKPOINT_FILE).exists()
        rows = (out / phase / "train_log.csv").read_text().splitlines()
        assert len(rows) == 1 + getattr(x, phase).steps
    adapter = json.loads((out / "mntp" / "adapter_config.json").read_text())
    assert adapter["base_model_name_or_path"] == str(tiny_llm_dir)

    cfg = tiny_config
    cfg.teacher.kind, cfg.teacher.model, cfg.teacher.adapter = "llm2vec", str(out / "mntp"), str(out / "simcse")
    teacher = build_teacher(cfg)
    emb = teacher.embed(["Paris is the capital of France.", "Two plus two is four."])
    assert emb.shape == (2, 64) and np.isfinite(emb).all()
    # trained: differs from the bare bidirectional base's mean
    from transformers import AutoModel

    from l2vg_ray.generate.teacher import make_bidirectional

    base = make_bidirectional(AutoModel.from_pretrained(str(tiny_llm_dir))).eval()
    tok = steps.tokenizer_for(str(tiny_llm_dir))
    with torch.no_grad():
        plain = base(**tok(["Paris is the capital of France."], return_tensors="pt")).last_hidden_state[0].mean(0)
    assert np.abs(emb[0] - plain.numpy()).max() > 1e-4


def test_an_interrupted_step_resumes_to_the_same_adapter(tiny_llm_dir, tiny_config, tmp_path):
    from safetensors.torch import load_file

    x = _cfg(tiny_config)
    for name in ("straight", "resumed"):
        _write_corpus(tmp_path / name)
    args = {n: WorkerArgs(cfg=x, llm=str(tiny_llm_dir), base_path=str(tiny_llm_dir),
                          output_dir=str(tmp_path / n), phase="mntp") for n in ("straight", "resumed")}
    train_phase(args["straight"])
    (tmp_path / "resumed" / "mntp").mkdir()
    first = PhaseTrainer(args["resumed"])
    first.setup()
    first.train_step(), first.train_step()
    first.save_checkpoint()  # then the worker dies
    second = PhaseTrainer(args["resumed"])
    second.setup()
    assert second.step == 2
    second.train()
    second.save()
    a = load_file(str(tmp_path / "straight" / "mntp" / "adapter_model.safetensors"))
    b = load_file(str(tmp_path / "resumed" / "mntp" / "adapter_model.safetensors"))
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key])


def test_a_mask_token_of_several_tokens_is_refused(tiny_llm_dir):
    tok = steps.tokenizer_for(str(tiny_llm_dir))
    with pytest.raises(ValueError, match="llm2vec.mntp.mask_token='<<masked>>' is"):
        steps.mask_token_id(tok, "<<masked>>")
