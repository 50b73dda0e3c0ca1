"""Baselines: pooling is exact, instructions are excluded from the pool, registry names."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from l2vg_ray.loading import load_encoder
from l2vg_ray.text_encoders import BASELINES, TextEncoder, pool_hidden_states


def test_registered_baselines():
    import l2vg_ray.generate.baseline  # noqa: F401  (generate-then-encode lives with the backends)

    assert {"teacher", "mean-pool", "last-token", "generate-then-encode"} <= set(BASELINES.names())


def test_pool_hidden_states():
    h = torch.arange(2 * 3 * 2, dtype=torch.float32).reshape(2, 3, 2)
    mask = torch.tensor([[1, 1, 0], [0, 1, 1]])
    torch.testing.assert_close(pool_hidden_states(h, mask, "mean"), torch.stack([h[0, :2].mean(0), h[1, 1:].mean(0)]))
    torch.testing.assert_close(pool_hidden_states(h, mask, "last"), torch.stack([h[0, 1], h[1, 2]]))
    with pytest.raises(ValueError, match="pooling"):
        pool_hidden_states(h, mask, "max")


def test_mean_pool_and_last_token_on_tiny_llm(tiny_config):
    mean = load_encoder("mean-pool", tiny_config)
    last = load_encoder("last-token", tiny_config)
    assert isinstance(mean, TextEncoder) and mean.fingerprint() != last.fingerprint()
    texts = ["What is the capital of France?", "Why is the sky blue?", "Who wrote Hamlet?"]
    a = mean.encode(texts, batch_size=2)
    assert a.shape == (3, mean.dim) and np.isfinite(a).all()
    # Batching and padding do not change a text's embedding.
    np.testing.assert_allclose(mean.encode(texts[1:2]), a[1:2], atol=1e-5)
    np.testing.assert_allclose(last.encode(texts[2:3]), last.encode(texts)[2:3], atol=1e-5)
    ids, attn, pool = mean._batch(["Hello"], "Summarise")
    n_prefix = len(mean.tokenizer("Summarise: ", add_special_tokens=False)["input_ids"])
    assert pool[0, :n_prefix].sum() == 0 and pool[0].sum() == attn[0].sum() - n_prefix
    assert not np.allclose(mean.encode(texts[:1], instruction="Summarise"), a[:1])


def test_teacher_baseline(tiny_config):
    enc = load_encoder("teacher", tiny_config)
    out = enc.encode(["the bread", "the sea"], normalize=True)
    assert out.shape == (2, enc.dim)
    np.testing.assert_allclose(np.linalg.norm(out, axis=1), 1.0, rtol=1e-5)


def test_generate_then_encode_embeds_the_response(tiny_config):
    from l2vg_ray.generate.baseline import GenerateThenEncode

    class FixedBackend:
        def generate(self, queries):
            from l2vg_ray.generate.backends import Generation

            return [Generation(text=f"the bread {len(q)}", n_tokens=3) for q in queries]

    teacher = load_encoder("teacher", tiny_config)
    gte = GenerateThenEncode(FixedBackend(), teacher, llm_spec="x", settings={"t": 0})
    out = gte.encode(["a", "bb"], instruction="Say")
    np.testing.assert_allclose(out, teacher.encode(["the bread 4", "the bread 5"]), atol=1e-6)
    assert gte.generate(["a"], instruction="Say") == ["the bread 6"]  # "Say: a"


def test_token_counts_include_the_instruction_and_models_state_their_limit(tiny_config):
    """What serving's token budget relies on: count_tokens(texts, instruction=) counts what the
    model reads before its own cut at max_input_tokens."""
    texts = ["What is the capital of France?", "Why?"]
    mean = load_encoder("mean-pool", tiny_config)
    ids, attn, _ = mean._batch(texts, "Summarise")
    assert mean.count_tokens(texts, instruction="Summarise") == attn.sum(1).tolist()
    assert mean.max_input_tokens == mean.max_length
    teacher = load_encoder("teacher", tiny_config)
    with_instruction = teacher.count_tokens(texts, instruction="Find:")
    assert with_instruction == teacher.count_tokens([f"Find: {t}" for t in texts])
    assert all(a > b for a, b in zip(with_instruction, teacher.count_tokens(texts), strict=True))
    assert teacher.max_input_tokens == teacher.model.max_seq_length
    assert teacher.tokenizer.is_fast  # serving cuts texts at the tokenizer's offsets


def test_teacher_baseline_of_an_llm2vec_teacher_embeds_plain_texts(tiny_config, tiny_llm2vec_adapters):
    """teacher.kind=llm2vec evaluates as it embeds responses: the instruction is dropped."""
    from l2vg_ray.generate.teacher import build_teacher

    mntp, simcse = tiny_llm2vec_adapters
    tiny_config.teacher.kind, tiny_config.teacher.model = "llm2vec", str(mntp)
    tiny_config.teacher.adapter = str(simcse)
    enc = load_encoder("teacher", tiny_config)
    texts = ["Paris is the capital of France.", "Two plus two is four."]
    expected = build_teacher(tiny_config).embed(texts)
    np.testing.assert_allclose(enc.encode(texts, instruction="Retrieve a passage"), expected, atol=1e-5)
    assert enc.dim == 64 and enc.count_tokens(texts, instruction="x") == enc.count_tokens(texts)
