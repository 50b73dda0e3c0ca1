"""Request parsing, validation and response building of the serving API (pure: no Ray, no
model)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from l2vg_ray.config import ServeConfig
from l2vg_ray.serve.protocol import (
    APIError,
    DecodeRequest,
    EmbeddingRequest,
    Fitted,
    check_decode_request,
    check_embedding_request,
    decode_base64,
    embedding_response,
    encode_base64,
    parse_request,
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
