"""The serving API's request/response models and their validation: pure functions, no Ray.

Requests are parsed by hand from the raw body (not by FastAPI's body models) so that every bad
input - invalid JSON, wrong types, empty or non-string items, too many items, a body over the
size limit, an unknown model - becomes an ``APIError`` with an OpenAI-style body that names the
offending parameter, never a 500.

Long texts (``serve.max_tokens_per_text``, counted with the encoder's ``count_tokens``):
with ``serve.truncate=true`` they are cut to the longest prefix within the limit and ``usage``
counts the kept tokens; with ``serve.truncate=false`` the request is answered 413
(``context_length_exceeded``). The encoder may cut further at its own maximum input length.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

ENCODING_FORMATS = ("float", "base64")
DEFAULT_DECODE_TOKENS = 64


class APIError(Exception):
    """An error answered to the client as ``{"error": {message, type, param, code}}``."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        type: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.type = type or ("invalid_request_error" if status < 500 else "server_error")

    def body(self) -> dict:
        return error_body(self.message, type=self.type, param=self.param, code=self.code)


def error_body(
    message: str,
    *,
    type: str = "invalid_request_error",
    param: str | None = None,
    code: str | None = None,
) -> dict:
    """The OpenAI error shape."""
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


@dataclass(frozen=True)
class Limits:
    """What one request may ask for (from ``cfg.serve``)."""

    max_items: int = 256
    max_request_bytes: int = 1_000_000
    max_tokens_per_text: int = 512
    truncate: bool = True
    max_new_tokens: int = 128

    @classmethod
    def from_config(cls, serve_cfg: Any) -> Limits:
        return cls(
            max_items=int(serve_cfg.max_items_per_request),
            max_request_bytes=int(serve_cfg.max_request_bytes),
            max_tokens_per_text=int(serve_cfg.max_tokens_per_text),
            truncate=bool(serve_cfg.truncate),
            max_new_tokens=int(serve_cfg.max_new_tokens),
        )


@dataclass(frozen=True)
class EmbeddingRequest:
    texts: list[str]
    model: str
    encoding_format: str = "float"
    dimensions: int | None = None
    instruction: str | None = None


@dataclass(frozen=True)
class DecodeRequest:
    texts: list[str]
    model: str
    instruction: str | None = None
    max_new_tokens: int = DEFAULT_DECODE_TOKENS


def _type_name(value: Any) -> str:
    if value is None:
        return "null"
    return {
        bool: "boolean",
        int: "integer",
        float: "number",
        str: "string",
        list: "array",
        dict: "object",
    }.get(type(value), type(value).__name__)


def body_too_large(size: int, limit: int) -> APIError:
    return APIError(
        413,
        f"The request body has {size} bytes, over the limit of {limit} bytes "
        f"(serve.max_request_bytes). Send fewer or shorter texts per request.",
        code="request_too_large",
    )


def parse_json_body(body: bytes, *, max_bytes: int) -> dict[str, Any]:
    """Raw request bytes -> the JSON object, or an APIError (413 too large, 400 otherwise)."""
    if len(body) > max_bytes:
        raise body_too_large(len(body), max_bytes)
    if not body.strip():
        raise APIError(
            400,
            "The request body is empty; send a JSON object such as "
            '{"input": "some text", "model": "..."}.',
            code="invalid_json",
        )
    try:
        obj = json.loads(body.decode("utf-8-sig"))
    except UnicodeDecodeError:
        raise APIError(
            400, "The request body is not UTF-8 text; send UTF-8 encoded JSON.", code="invalid_json"
        ) from None
    except json.JSONDecodeError as e:
        raise APIError(
            400,
            f"The request body is not valid JSON: {e.msg} at line {e.lineno} column {e.colno}.",
            code="invalid_json",
        ) from None
    if not isinstance(obj, dict):
        raise APIError(
            400,
            f"The request body must be a JSON object, got a JSON {_type_name(obj)}.",
            code="invalid_json",
        )
    return obj


def parse_texts(value: Any, *, max_items: int, param: str = "input") -> list[str]:
    """``input``: a non-empty string or a non-empty list of non-empty strings."""
    if value is None:
        raise APIError(
            400,
            f"Missing required parameter '{param}': a string or a list of strings.",
            param=param,
            code="missing_required_parameter",
        )
    if isinstance(value, str):
        value = [value]
    elif not isinstance(value, list):
        raise APIError(
            400,
            f"'{param}' must be a string or a list of strings, got a {_type_name(value)}.",
            param=param,
            code="invalid_type",
        )
    if not value:
        raise APIError(
            400,
            f"'{param}' is an empty list; send at least one string.",
            param=param,
            code="empty_input",
        )
    if len(value) > max_items:
        raise APIError(
            400,
            f"'{param}' has {len(value)} items, over the limit of {max_items} per "
            f"request (serve.max_items_per_request). Split it over several requests.",
            param=param,
            code="too_many_items",
        )
    for i, item in enumerate(value):
        if isinstance(item, str):
            if not item.strip():
                raise APIError(
                    400,
                    f"'{param}[{i}]' is an empty string; every input must hold some text.",
                    param=f"{param}[{i}]",
                    code="empty_input",
                )
            continue
        hint = (
            " Token-id inputs are not supported; send the text."
            if isinstance(item, (int, list)) and not isinstance(item, bool)
            else ""
        )
        raise APIError(
            400,
            f"'{param}[{i}]' must be a string, got a {_type_name(item)}.{hint}",
            param=f"{param}[{i}]",
            code="invalid_type",
        )
    return value


def _optional(obj: dict, key: str, kind: type, type_label: str) -> Any:
    value = obj.get(key)
    if value is None:
        return None
    if not isinstance(value, kind) or isinstance(value, bool) and kind is not bool:
        raise APIError(
            400,
            f"'{key}' must be {type_label}, got a {_type_name(value)}.",
            param=key,
            code="invalid_type",
        )
    return value


def check_model(obj: dict, served_model: str) -> str:
    """``model`` may be omitted; when given it must be the served model's name."""
    model = _optional(obj, "model", str, "a string")
    if model is not None and model != served_model:
        raise APIError(
            404,
            f"The model {model!r} does not exist here; this server serves "
            f"{served_model!r} (see GET /v1/models).",
            param="model",
            code="model_not_found",
        )
    return served_model


def parse_embedding_request(
    obj: dict, *, limits: Limits, served_model: str, dim: int
) -> EmbeddingRequest:
    texts = parse_texts(obj.get("input"), max_items=limits.max_items)
    model = check_model(obj, served_model)
    fmt = _optional(obj, "encoding_format", str, "a string") or "float"
    if fmt not in ENCODING_FORMATS:
        raise APIError(
            400,
            f"'encoding_format' must be one of {list(ENCODING_FORMATS)}, got {fmt!r}.",
            param="encoding_format",
            code="invalid_value",
        )
    dimensions = _optional(obj, "dimensions", int, "an integer")
    if dimensions is not None and dimensions != dim:
        raise APIError(
            400,
            f"'dimensions'={dimensions} is not supported: {served_model!r} has "
            f"{dim}-dimensional embeddings and cannot shorten them. Omit 'dimensions' "
            f"or pass {dim}.",
            param="dimensions",
            code="invalid_value",
        )
    instruction = _optional(obj, "instruction", str, "a string")
    return EmbeddingRequest(texts, model, fmt, dimensions, instruction or None)


def parse_decode_request(obj: dict, *, limits: Limits, served_model: str) -> DecodeRequest:
    texts = parse_texts(obj.get("input"), max_items=limits.max_items)
    model = check_model(obj, served_model)
    instruction = _optional(obj, "instruction", str, "a string")
    max_new = _optional(obj, "max_new_tokens", int, "an integer")
    if max_new is None:
        max_new = min(DEFAULT_DECODE_TOKENS, limits.max_new_tokens)
    if not 1 <= max_new <= limits.max_new_tokens:
        raise APIError(
            400,
            f"'max_new_tokens' must be between 1 and {limits.max_new_tokens} "
            f"(serve.max_new_tokens), got {max_new}.",
            param="max_new_tokens",
            code="invalid_value",
        )
    return DecodeRequest(texts, model, instruction or None, max_new)


CountFn = Callable[[Sequence[str]], list[int]]


def truncate_to_tokens(text: str, max_tokens: int, count_tokens: CountFn) -> str:
    """The longest prefix of ``text`` with at most ``max_tokens`` tokens (binary search).

    Works with any encoder's ``count_tokens``, special tokens included, at O(log len) calls;
    it runs only for texts over the limit.
    """
    lo, hi = 0, len(text)  # invariant: text[:lo] fits (or lo == 0)
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if count_tokens([text[:mid]])[0] <= max_tokens:
            lo = mid
        else:
            hi = mid - 1
    return text[:lo]


def limit_text(
    text: str,
    n_tokens: int,
    count_tokens: CountFn,
    *,
    max_tokens: int,
    truncate: bool,
    param: str,
) -> tuple[str, int]:
    """One text within ``max_tokens``: unchanged, truncated, or a 413. Returns (text, tokens)."""
    if n_tokens <= max_tokens:
        return text, n_tokens
    if not truncate:
        raise APIError(
            413,
            f"'{param}' has {n_tokens} tokens, over the limit of {max_tokens} tokens per text "
            f"(serve.max_tokens_per_text). Shorten it, or run the server with "
            f"serve.truncate=true.",
            param=param,
            code="context_length_exceeded",
        )
    cut = truncate_to_tokens(text, max_tokens, count_tokens)
    if not cut:
        raise APIError(
            413,
            f"'{param}' cannot be cut to {max_tokens} tokens (serve.max_tokens_per_text is too "
            f"small for this encoder).",
            param=param,
            code="context_length_exceeded",
        )
    return cut, count_tokens([cut])[0]


def apply_token_limit(
    texts: list[str],
    count_tokens: CountFn,
    *,
    max_tokens: int,
    truncate: bool,
    param: str = "input",
) -> tuple[list[str], list[int]]:
    """Enforce ``max_tokens`` per text: truncate or raise 413. Returns (texts, token counts)."""
    out = [
        limit_text(
            t, n, count_tokens, max_tokens=max_tokens, truncate=truncate, param=f"{param}[{i}]"
        )
        for i, (t, n) in enumerate(zip(texts, count_tokens(texts), strict=True))
    ]
    return [t for t, _ in out], [n for _, n in out]


def encode_base64(vector: np.ndarray) -> str:
    """OpenAI's base64 format: the little-endian float32 bytes of the vector."""
    return base64.b64encode(np.asarray(vector, dtype="<f4").tobytes()).decode("ascii")


def decode_base64(data: str) -> np.ndarray:
    return np.frombuffer(base64.b64decode(data), dtype="<f4")


def embedding_response(
    vectors: np.ndarray, *, model: str, encoding_format: str, token_counts: Sequence[int]
) -> dict:
    vectors = np.asarray(vectors, dtype=np.float32)
    data = [
        {
            "object": "embedding",
            "index": i,
            "embedding": encode_base64(v) if encoding_format == "base64" else v.tolist(),
        }
        for i, v in enumerate(vectors)
    ]
    n = int(sum(token_counts))
    return {
        "object": "list",
        "data": data,
        "model": model,
        "usage": {"prompt_tokens": n, "total_tokens": n},
    }


def decode_response(decoded: Sequence[str], *, model: str, token_counts: Sequence[int]) -> dict:
    data = [{"object": "decoded_text", "index": i, "text": t} for i, t in enumerate(decoded)]
    n = int(sum(token_counts))
    return {
        "object": "list",
        "data": data,
        "model": model,
        "usage": {"prompt_tokens": n, "total_tokens": n},
    }


def encode_grouped(
    encoder: Any,
    items: Sequence[tuple[str, str | None]],
    *,
    batch_size: int,
    normalize: bool,
) -> list[np.ndarray]:
    """Embed (text, instruction) pairs from many requests: one ``encode`` call per instruction.

    Returns one row per item, in order (the shape ``@serve.batch`` expects).
    """
    groups: dict[str | None, list[int]] = {}
    for i, (_, instruction) in enumerate(items):
        groups.setdefault(instruction, []).append(i)
    rows: list[np.ndarray | None] = [None] * len(items)
    for instruction, idx in groups.items():
        vectors = encoder.encode(
            [items[i][0] for i in idx],
            instruction=instruction,
            batch_size=batch_size,
            normalize=normalize,
        )
        for i, v in zip(idx, vectors, strict=True):
            rows[i] = v
    return rows  # type: ignore[return-value]


# One text of a request inside a batch: (its index in the request's `input`, text, instruction).
EmbedItem = tuple[int, str, "str | None"]


def embed_items(
    encoder: Any,
    items: Sequence[EmbedItem],
    *,
    max_tokens: int,
    truncate: bool,
    batch_size: int,
    normalize: bool,
) -> list[tuple[np.ndarray, int] | APIError]:
    """Token-limit and embed texts gathered from one or many requests, in one pass.

    One ``count_tokens`` call for all texts, then one ``encode`` call per instruction. Returns per
    item ``(vector, n_tokens)``, or the ``APIError`` of a text over the limit (so that one bad
    request in a batch fails alone).
    """
    counts = encoder.count_tokens([text for _, text, _ in items])
    results: list[tuple[np.ndarray, int] | APIError | None] = [None] * len(items)
    ok: list[int] = []
    kept: list[tuple[str, str | None]] = []
    for j, ((index, text, instruction), n) in enumerate(zip(items, counts, strict=True)):
        try:
            text, n = limit_text(
                text,
                n,
                encoder.count_tokens,
                max_tokens=max_tokens,
                truncate=truncate,
                param=f"input[{index}]",
            )
        except APIError as e:
            results[j] = e
            continue
        ok.append(j)
        kept.append((text, instruction))
        results[j] = (None, n)  # type: ignore[assignment]
    if kept:
        vectors = encode_grouped(encoder, kept, batch_size=batch_size, normalize=normalize)
        for j, v in zip(ok, vectors, strict=True):
            results[j] = (v, results[j][1])  # type: ignore[index]
    return results  # type: ignore[return-value]
