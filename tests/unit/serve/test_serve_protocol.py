"""Request parsing, token budget, batching and response building of the serving API (pure: no
Ray, no model)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from l2vg_ray.config import ServeConfig
from l2vg_ray.serve.protocol import (
    APIError,
    DecodeRequest,
    EmbeddingRequest,
    EmbedItem,
    Fitted,
    check_decode_request,
    check_embedding_request,
    decode_base64,
    embed_items,
    embedding_response,
    encode_base64,
    fit_texts,
    parse_request,
    plan_batches,
)

LIMITS = ServeConfig(
    max_items_per_request=4, max_request_bytes=200, max_tokens_per_text=5, truncate=True, max_new_tokens=16
)


def _raises(fn, status: int, code: str, param: str | None = None) -> APIError:
    with pytest.raises(APIError) as info:
        fn()
    err = info.value
    assert (err.status, err.code, err.param) == (status, code, param), err.message
    body = err.body()["error"]
    assert set(body) == {"message", "type", "param", "code"} and body["message"]
    assert body["type"] == ("invalid_request_error" if status < 500 else "server_error")
    return err


def _embedding(obj) -> EmbeddingRequest:
    raw = obj if isinstance(obj, bytes) else json.dumps(obj).encode()
    return parse_request(EmbeddingRequest, raw)


@pytest.mark.parametrize(
    "body,fragment",
    [
        (b"", "empty"),
        (b"   ", "empty"),
        (b"{", "not valid JSON"),
        (b'{"input": "\xff\xfe"}', "not valid JSON"),  # not UTF-8
        (b"[1, 2]", "must be a JSON object"),
        (b'"text"', "must be a JSON object"),
        (b"null", "must be a JSON object"),
        # what a security review sends: a lone surrogate, deep nesting, a huge integer
        (rb'{"input": "\ud800"}', "not valid JSON"),
        (b'{"input": "a", "x": ' + b"[" * 1500 + b"]" * 1500 + b"}", "recursion"),
        (b'{"input": "a", "dimensions": ' + b"9" * 5001 + b"}", "not valid JSON"),
    ],
)
def test_bad_bodies_are_400_invalid_json(body, fragment):
    err = _raises(lambda: _embedding(body), 400, "invalid_json")
    assert fragment in err.message


def test_lone_surrogate_and_bom():
    body = rb'{"input": ["ok", "\ud800x"]}'
    err = _raises(lambda: _embedding(body), 400, "invalid_json")
    assert "Unicode" in err.message
    assert _embedding(b"\xef\xbb\xbf" + b'{"input": "a"}').input == ["a"]
    # built in Python rather than parsed from JSON: the text validator still refuses it
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="not valid Unicode"):
        EmbeddingRequest.model_validate({"input": "\ud800"})


@pytest.mark.parametrize(
    "value,code,param",
    [
        (None, "missing_required_parameter", "input"),
        ({"a": 1}, "invalid_type", "input"),
        (3, "invalid_type", "input"),
        ([], "empty_input", "input"),
        ("", "empty_input", "input[0]"),
        (["ok", " \n"], "empty_input", "input[1]"),
        (["ok", 1], "invalid_type", "input[1]"),
        (["ok", True], "invalid_type", "input[1]"),
        (["ok", None], "invalid_type", "input[1]"),
        ([[1, 2]], "invalid_type", "input[0]"),
    ],
)
def test_input_rejections(value, code, param):
    obj = {} if value is None else {"input": value}
    _raises(lambda: _embedding(obj), 400, code, param)


def test_input_accepts_string_and_list_and_ignores_unknown_fields():
    assert _embedding({"input": "hello"}).input == ["hello"]
    req = _embedding(
        {
            "input": ["a", "b"],
            "model": "m",
            "encoding_format": "base64",
            "dimensions": 8,
            "instruction": "Find:",
            "user": "someone",  # unknown OpenAI fields are ignored
        }
    )
    assert (req.input, req.model, req.encoding_format, req.dimensions, req.instruction) == (
        ["a", "b"],
        "m",
        "base64",
        8,
        "Find:",
    )
    assert _embedding({"input": "a"}).encoding_format == "float"


def test_token_ids_get_a_hint():
    err = _raises(lambda: _embedding({"input": [[1, 2]]}), 400, "invalid_type", "input[0]")
    assert "Token-id inputs are not supported" in err.message


@pytest.mark.parametrize(
    "extra,status,code,param",
    [
        ({"model": "other"}, 404, "model_not_found", "model"),
        ({"model": 1}, 400, "invalid_type", "model"),
        ({"encoding_format": "int8"}, 400, "invalid_value", "encoding_format"),
        ({"encoding_format": 1}, 400, "invalid_value", "encoding_format"),
        ({"dimensions": 4}, 400, "invalid_value", "dimensions"),
        ({"dimensions": 8.0}, 400, "invalid_type", "dimensions"),
        ({"dimensions": "8"}, 400, "invalid_type", "dimensions"),
        ({"dimensions": True}, 400, "invalid_type", "dimensions"),
        ({"instruction": 5}, 400, "invalid_type", "instruction"),
        ({"input": ["a"] * 5}, 400, "too_many_items", "input"),
    ],
)
def test_embedding_request_rejections(extra, status, code, param):
    obj = {"input": "a", **extra}
    _raises(
        lambda: check_embedding_request(_embedding(obj), limits=LIMITS, served_model="m", dim=8),
        status,
        code,
        param,
    )


def test_dimensions_error_names_the_model_dim():
    err = _raises(
        lambda: check_embedding_request(
            _embedding({"input": "a", "dimensions": 4}), limits=LIMITS, served_model="m", dim=8
        ),
        400,
        "invalid_value",
        "dimensions",
    )
    assert "8" in err.message and "Omit 'dimensions'" in err.message


def test_decode_request():
    def check(obj):
        req = parse_request(DecodeRequest, json.dumps(obj).encode())
        return check_decode_request(req, limits=LIMITS, served_model="m")

    assert check({"input": "a"}) == ("m", 16)  # min(64, serve.max_new_tokens)
    assert check({"input": ["a"], "max_new_tokens": 3, "instruction": "x"}) == ("m", 3)
    for bad, code in ((0, "invalid_value"), (17, "invalid_value"), ("3", "invalid_type")):
        _raises(
            lambda bad=bad: check({"input": "a", "max_new_tokens": bad}),
            400,
            code,
            "max_new_tokens",
        )


def test_request_schemas_document_the_fields():
    schema = EmbeddingRequest.model_json_schema()
    assert schema["required"] == ["input"]
    assert {"input", "model", "encoding_format", "dimensions", "instruction"} <= set(
        schema["properties"]
    )
    assert {v["type"] for v in schema["properties"]["input"]["anyOf"]} == {"string", "array"}


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


def test_plan_batches_caps_texts_and_padded_tokens():
    tokens = [5, 1, 9, 2, 2, 30]
    plan = plan_batches(tokens, max_batch_size=3, max_batch_tokens=20)
    assert sorted(i for b in plan for i in b) == list(range(6))
    for b in plan:
        assert len(b) <= 3
        assert len(b) == 1 or max(tokens[i] for i in b) * len(b) <= 20
    assert [5] in plan  # 30 tokens: alone, even over the cap
    assert plan_batches([], max_batch_size=3, max_batch_tokens=20) == []


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


def test_base64_round_trip_is_little_endian_float32():
    v = np.array([1.0, -2.5, 3.25e-3], dtype=np.float32)
    data = encode_base64(v)
    assert decode_base64(data).tolist() == v.tolist()
    import base64

    assert base64.b64decode(data) == v.astype("<f4").tobytes()


def test_embedding_response_shape():
    vecs = np.arange(6, dtype=np.float32).reshape(2, 3)
    out = embedding_response(
        vecs, model="m", encoding_format="float", fitted=[Fitted("a", 2), Fitted("b", 3)]
    )
    assert out["object"] == "list" and out["model"] == "m"
    assert out["usage"] == {"prompt_tokens": 5, "total_tokens": 5}
    assert out["data"] == [
        {"object": "embedding", "index": 0, "embedding": [0.0, 1.0, 2.0]},
        {"object": "embedding", "index": 1, "embedding": [3.0, 4.0, 5.0]},
    ]
    b64 = embedding_response(
        vecs, model="m", encoding_format="base64", fitted=[Fitted("a", 2), Fitted("b", 3)]
    )
    assert decode_base64(b64["data"][1]["embedding"]).tolist() == [3.0, 4.0, 5.0]
