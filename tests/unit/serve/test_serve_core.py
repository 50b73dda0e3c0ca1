"""The model replica's work on texts: token budget, batch planning, batched embedding and
decoding (pure: no Ray; a stand-in encoder that counts words as tokens)."""

from __future__ import annotations

import numpy as np

from l2vg_ray.config import ServeConfig
from l2vg_ray.serve.core import (
    EmbedItem,
    decode_texts,
    embed_items,
    fit_texts,
    plan_request_batches,
)
from l2vg_ray.serve.protocol import APIError, Fitted

LIMITS = ServeConfig(
    max_items_per_request=4, max_request_bytes=200, max_tokens_per_text=5, truncate=True, max_new_tokens=16
)


class _WordEncoder:
    """A stand-in encoder: one token per word, one special token, instruction words counted;
    a fast-tokenizer-like ``tokenizer`` that gives word offsets."""

    dim = 2
    max_input_tokens = 100

    def __init__(self, fail_on: str | None = None):
        self.calls = []
        self.fail_on = fail_on

    @staticmethod
    def _words(text):
        import re

        return [m.span() for m in re.finditer(r"\S+", text)]

    def count_tokens(self, texts, *, instruction=None):
        extra = len(instruction.split()) if instruction else 0
        return [len(self._words(t)) + 1 + extra for t in texts]

    def tokenizer(self, texts, *, add_special_tokens, return_offsets_mapping):
        assert not add_special_tokens and return_offsets_mapping
        return {"offset_mapping": [self._words(t) for t in texts]}

    def encode(self, texts, *, instruction=None, batch_size=32, normalize=False):
        if self.fail_on is not None and self.fail_on in texts:
            raise RuntimeError("this text breaks the model")
        self.calls.append((list(texts), instruction, batch_size))
        return np.array(
            [[len(t), 0.0 if instruction is None else 1.0] for t in texts], dtype=np.float32
        )

    def decode(self, texts, *, instruction=None, max_new_tokens=64):
        self.calls.append((list(texts), instruction, max_new_tokens))
        return [f"decoded {t}" for t in texts]


def test_fit_texts_truncates_once_and_counts_the_instruction():
    enc = _WordEncoder()
    texts = ["a b", "one two three four five six"]
    out = fit_texts(enc, texts, None, limits=LIMITS)
    assert out[0] == Fitted("a b", 3)
    assert out[1] == Fitted("one two three four", 5, truncated=True)  # 4 words + 1 special
    # the instruction takes its share of the 5 tokens: 2 words + 1 special leave 2 words
    out = fit_texts(enc, texts, "find this", limits=LIMITS)
    assert out[0] == Fitted("a b", 5) and out[1] == Fitted("one two", 5, truncated=True)
    # an instruction that alone fills the budget is the request's fault, said so
    err = fit_texts(enc, ["a"], "w " * 6, limits=LIMITS)[0]
    assert isinstance(err, APIError) and (err.status, err.param, err.code) == (
        400,
        "instruction",
        "instruction_too_long",
    )
    # the model's own limit caps the budget too
    enc.max_input_tokens = 3
    assert fit_texts(enc, ["one two three"], None, limits=LIMITS)[0] == Fitted(
        "one two", 3, truncated=True
    )


def test_fit_texts_without_truncation_is_413():
    enc = _WordEncoder()
    limits = ServeConfig(max_items_per_request=4, max_tokens_per_text=5, truncate=False)
    out = fit_texts(enc, ["a b", "one two three four five six"], None, limits=limits)
    assert out[0] == Fitted("a b", 3)
    assert isinstance(out[1], APIError) and (out[1].status, out[1].param) == (413, "input[1]")
    assert "7 tokens" in out[1].message and "serve.truncate=true" in out[1].message


def test_plan_request_batches_caps_texts_and_padded_tokens():
    tokens = [5, 1, 9, 2, 2, 30]
    plan = plan_request_batches(tokens, max_batch_size=3, max_batch_tokens=20)
    assert sorted(i for b in plan for i in b) == list(range(6))
    for b in plan:
        assert len(b) <= 3
        assert len(b) == 1 or max(tokens[i] for i in b) * len(b) <= 20
    assert [5] in plan  # 30 tokens: alone, even over the cap
    assert plan_request_batches([], max_batch_size=3, max_batch_tokens=20) == []


def _items(*specs):
    return [EmbedItem(r, i, t, ins) for r, i, t, ins in specs]


def test_embed_items_groups_by_instruction_and_reports_usage():
    enc = _WordEncoder()
    items = _items(
        (0, 0, "a b", None), (1, 0, "one two three four five six", "q:"), (0, 1, "x", None)
    )
    out = embed_items(
        enc, items, limits=LIMITS, max_batch_size=8, max_batch_tokens=100, normalize=False
    )
    assert [f.tokens for _, f in out] == [3, 5, 2]
    assert out[1][1] == Fitted("one two three", 5, truncated=True)
    assert out[1][0].tolist() == [len("one two three"), 1.0]  # embedded after truncation
    assert sorted(c[1] or "" for c in enc.calls) == ["", "q:"]


def test_a_failing_request_fails_alone_in_its_batch():
    enc = _WordEncoder(fail_on="poison")
    items = _items(
        (0, 0, "fine", None), (1, 0, "poison", None), (1, 1, "ok", None), (2, 0, "good", None)
    )
    out = embed_items(
        enc, items, limits=LIMITS, max_batch_size=8, max_batch_tokens=100, normalize=False
    )
    assert isinstance(out[1], APIError) and isinstance(out[2], APIError)
    assert out[1].status == 500 and out[1].code == "embedding_failed"
    assert out[0][0].tolist() == [4.0, 0.0] and out[3][0].tolist() == [4.0, 0.0]


def test_over_limit_texts_fail_only_their_request_and_are_never_encoded():
    enc = _WordEncoder()
    limits = ServeConfig(max_items_per_request=4, max_tokens_per_text=4, truncate=False)
    items = _items((0, 0, "a b", None), (1, 2, "one two three four five six", None))
    out = embed_items(
        enc, items, limits=limits, max_batch_size=8, max_batch_tokens=100, normalize=False
    )
    assert out[0][1] == Fitted("a b", 3)
    assert isinstance(out[1], APIError) and out[1].param == "input[2]"
    assert enc.calls == [(["a b"], None, 1)]


def test_decode_texts_decodes_what_fits_and_fails_the_request_on_an_error():
    enc = _WordEncoder()
    fitted, decoded = decode_texts(
        enc, ["a b", "one two three four five six"], None, limits=LIMITS, max_new_tokens=7
    )
    assert fitted == [Fitted("a b", 3), Fitted("one two three four", 5, truncated=True)]
    assert decoded == ["decoded a b", "decoded one two three four"]
    assert enc.calls == [(["a b", "one two three four"], None, 7)]
    err = decode_texts(enc, ["a", "b"], "w " * 6, limits=LIMITS, max_new_tokens=7)
    assert isinstance(err, APIError) and err.code == "instruction_too_long"
    assert len(enc.calls) == 1  # nothing decoded for a failed request
