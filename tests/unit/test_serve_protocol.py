"""Request validation and response building of the serving API (pure: no Ray, no model)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from l2vg_ray.serve.protocol import (
    APIError,
    Limits,
    apply_token_limit,
    decode_base64,
    embed_items,
    embedding_response,
    encode_base64,
    encode_grouped,
    parse_decode_request,
    parse_embedding_request,
    parse_json_body,
    parse_texts,
    truncate_to_tokens,
)

LIMITS = Limits(
    max_items=4, max_request_bytes=200, max_tokens_per_text=5, truncate=True, max_new_tokens=16
)


def words(texts):
    """A stand-in tokenizer: one token per word plus one special token."""
    return [len(t.split()) + 1 for t in texts]


def _raises(fn, status: int, code: str, param: str | None = None) -> APIError:
    with pytest.raises(APIError) as info:
        fn()
    err = info.value
    assert (err.status, err.code, err.param) == (status, code, param), err.message
    body = err.body()["error"]
    assert set(body) == {"message", "type", "param", "code"} and body["message"]
    assert body["type"] == ("invalid_request_error" if status < 500 else "server_error")
    return err


@pytest.mark.parametrize(
    "body,fragment",
    [
        (b"", "empty"),
        (b"   ", "empty"),
        (b"{", "not valid JSON"),
        (b"\xff\xfe", "not UTF-8"),
        (b"[1, 2]", "JSON array"),
        (b'"text"', "JSON string"),
        (b"null", "JSON null"),
    ],
)
def test_parse_json_body_rejects_non_objects(body, fragment):
    err = _raises(lambda: parse_json_body(body, max_bytes=100), 400, "invalid_json")
    assert fragment in err.message


def test_parse_json_body_size_limit():
    body = json.dumps({"input": "x" * 300}).encode()
    err = _raises(lambda: parse_json_body(body, max_bytes=200), 413, "request_too_large")
    assert str(len(body)) in err.message and "serve.max_request_bytes" in err.message
    assert parse_json_body(b'{"input": "a"}', max_bytes=200) == {"input": "a"}


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
        ([[1, 2]], "invalid_type", "input[0]"),
        (["a"] * 5, "too_many_items", "input"),
    ],
)
def test_parse_texts_rejections(value, code, param):
    _raises(lambda: parse_texts(value, max_items=4), 400, code, param)


def test_parse_texts_accepts_string_and_list():
    assert parse_texts("hello", max_items=4) == ["hello"]
    assert parse_texts(["a", "b"], max_items=4) == ["a", "b"]


def test_token_ids_get_a_hint():
    err = _raises(lambda: parse_texts([[1, 2]], max_items=4), 400, "invalid_type", "input[0]")
    assert "Token-id inputs are not supported" in err.message


def test_parse_embedding_request_defaults_and_fields():
    req = parse_embedding_request({"input": ["a", "b"]}, limits=LIMITS, served_model="m", dim=8)
    assert (req.texts, req.model, req.encoding_format, req.dimensions, req.instruction) == (
        ["a", "b"],
        "m",
        "float",
        None,
        None,
    )
    req = parse_embedding_request(
        {
            "input": "a",
            "model": "m",
            "encoding_format": "base64",
            "dimensions": 8,
            "instruction": "Find:",
            "user": "someone",
        },  # unknown OpenAI fields are ignored
        limits=LIMITS,
        served_model="m",
        dim=8,
    )
    assert (req.encoding_format, req.dimensions, req.instruction) == ("base64", 8, "Find:")


@pytest.mark.parametrize(
    "extra,status,code,param",
    [
        ({"model": "other"}, 404, "model_not_found", "model"),
        ({"model": 1}, 400, "invalid_type", "model"),
        ({"encoding_format": "int8"}, 400, "invalid_value", "encoding_format"),
        ({"encoding_format": 1}, 400, "invalid_type", "encoding_format"),
        ({"dimensions": 4}, 400, "invalid_value", "dimensions"),
        ({"dimensions": 8.0}, 400, "invalid_type", "dimensions"),
        ({"dimensions": True}, 400, "invalid_type", "dimensions"),
        ({"instruction": 5}, 400, "invalid_type", "instruction"),
    ],
)
def test_parse_embedding_request_rejections(extra, status, code, param):
    obj = {"input": "a", **extra}
    _raises(
        lambda: parse_embedding_request(obj, limits=LIMITS, served_model="m", dim=8),
        status,
        code,
        param,
    )


def test_dimensions_error_names_the_model_dim():
    err = _raises(
        lambda: parse_embedding_request(
            {"input": "a", "dimensions": 4}, limits=LIMITS, served_model="m", dim=8
        ),
        400,
        "invalid_value",
        "dimensions",
    )
    assert "8" in err.message and "Omit 'dimensions'" in err.message


def test_parse_decode_request():
    req = parse_decode_request({"input": "a"}, limits=LIMITS, served_model="m")
    assert (req.texts, req.max_new_tokens, req.instruction) == (["a"], 16, None)  # min(64, cap)
    req = parse_decode_request(
        {"input": ["a"], "max_new_tokens": 3, "instruction": "x"}, limits=LIMITS, served_model="m"
    )
    assert (req.max_new_tokens, req.instruction) == (3, "x")
    for bad, code in ((0, "invalid_value"), (17, "invalid_value"), ("3", "invalid_type")):
        _raises(
            lambda bad=bad: parse_decode_request(
                {"input": "a", "max_new_tokens": bad}, limits=LIMITS, served_model="m"
            ),
            400,
            code,
            "max_new_tokens",
        )


def test_truncate_to_tokens_keeps_the_longest_fitting_prefix():
    text = "one two three four five six seven"
    cut = truncate_to_tokens(text, 4, words)  # 3 words + the special token
    assert words([cut]) == [4]
    assert text.startswith(cut)
    assert words([text[: len(cut) + 2]])[0] > 4  # one more word would not fit
    assert truncate_to_tokens("short", 4, words) == "short"


def test_apply_token_limit_truncates_or_413s():
    texts = ["a b", "one two three four five six"]
    out, counts = apply_token_limit(texts, words, max_tokens=5, truncate=True)
    assert out[0] == "a b" and out[1].startswith("one two three four")
    assert counts == words(out) and max(counts) <= 5
    err = _raises(
        lambda: apply_token_limit(texts, words, max_tokens=5, truncate=False),
        413,
        "context_length_exceeded",
        "input[1]",
    )
    assert "7 tokens" in err.message and "serve.truncate=true" in err.message
    # a limit below the encoder's fixed overhead cannot be met by truncation
    _raises(
        lambda: apply_token_limit(["a b"], words, max_tokens=0, truncate=True),
        413,
        "context_length_exceeded",
        "input[0]",
    )


def test_base64_round_trip_is_little_endian_float32():
    v = np.array([1.0, -2.5, 3.25e-3], dtype=np.float32)
    data = encode_base64(v)
    assert decode_base64(data).tolist() == v.tolist()
    import base64

    assert base64.b64decode(data) == v.astype("<f4").tobytes()


def test_embedding_response_shape():
    vecs = np.arange(6, dtype=np.float32).reshape(2, 3)
    out = embedding_response(vecs, model="m", encoding_format="float", token_counts=[2, 3])
    assert out["object"] == "list" and out["model"] == "m"
    assert out["usage"] == {"prompt_tokens": 5, "total_tokens": 5}
    assert out["data"] == [
        {"object": "embedding", "index": 0, "embedding": [0.0, 1.0, 2.0]},
        {"object": "embedding", "index": 1, "embedding": [3.0, 4.0, 5.0]},
    ]
    b64 = embedding_response(vecs, model="m", encoding_format="base64", token_counts=[2, 3])
    assert decode_base64(b64["data"][1]["embedding"]).tolist() == [3.0, 4.0, 5.0]


class _RecordingEncoder:
    dim = 2

    def __init__(self):
        self.calls = []

    def encode(self, texts, *, instruction=None, batch_size=32, normalize=False):
        self.calls.append((list(texts), instruction, batch_size))
        return np.array(
            [[len(t), 0.0 if instruction is None else 1.0] for t in texts], dtype=np.float32
        )


def test_encode_grouped_one_call_per_instruction_rows_in_order():
    enc = _RecordingEncoder()
    items = [("a", None), ("bb", "q:"), ("ccc", None), ("dddd", "q:")]
    rows = encode_grouped(enc, items, batch_size=7, normalize=False)
    assert [r.tolist() for r in rows] == [[1, 0], [2, 1], [3, 0], [4, 1]]
    assert enc.calls == [(["a", "ccc"], None, 7), (["bb", "dddd"], "q:", 7)]


class _WordEncoder(_RecordingEncoder):
    def count_tokens(self, texts):
        return words(texts)


def test_embed_items_limits_each_text_and_fails_only_its_request():
    enc = _WordEncoder()
    items = [(0, "a b", None), (1, "one two three four five six", "q:"), (0, "x", None)]
    out = embed_items(enc, items, max_tokens=4, truncate=True, batch_size=8, normalize=False)
    assert [n for _, n in out] == [3, 4, 2]
    cut = truncate_to_tokens("one two three four five six", 4, words)
    assert cut.split() == ["one", "two", "three"]
    assert out[1][0].tolist() == [len(cut), 1.0]  # embedded after truncation
    assert enc.calls == [(["a b", "x"], None, 8), ([cut], "q:", 8)]

    enc = _WordEncoder()
    out = embed_items(enc, items, max_tokens=4, truncate=False, batch_size=8, normalize=False)
    assert isinstance(out[1], APIError) and out[1].status == 413 and out[1].param == "input[1]"
    assert [n for _, n in (out[0], out[2])] == [3, 2]
    assert enc.calls == [(["a b", "x"], None, 8)]  # the rejected text is never encoded
