"""The serving API's typed requests, responses and token budget: pure functions, no Ray.

Requests are pydantic models (``EmbeddingRequest``, ``DecodeRequest``) parsed from the raw body by
pydantic's own JSON parser, so that invalid UTF-8, lone surrogates (``"\\ud800"``), nesting past
its recursion limit and out-of-range numbers are parse errors: every one is a 400 with an
OpenAI-style body naming the parameter, never a 500. What depends on the served model (how many
items, the model's name, its dimension) is checked after parsing by ``check_*``.

Token budget (``fit_texts``): a text may use ``min(serve.max_tokens_per_text, the encoder's own
max_input_tokens)`` tokens, *instruction included*. Over it, with ``serve.truncate=true`` the
text (never the instruction) is cut once, at a token boundary taken from the tokenizer's offsets,
and the response lists it in ``usage.truncated_inputs``; with ``serve.truncate=false`` the request
is answered 413 (``context_length_exceeded``). An instruction that alone fills the budget is a
400. ``usage`` counts the tokens the model actually read.
"""

from __future__ import annotations

import base64
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Annotated, Any, Literal

import numpy as np
from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    StrictInt,
    StrictStr,
    ValidationError,
    WithJsonSchema,
)
from pydantic_core import PydanticCustomError

if TYPE_CHECKING:
    from l2vg_ray.config import ServeConfig

log = logging.getLogger(__name__)

DEFAULT_DECODE_TOKENS = 64
_BOM = b"\xef\xbb\xbf"


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

    def __reduce__(self) -> tuple:  # crosses Ray boundaries (model replica -> HTTP ingress)
        return (
            _rebuild_api_error,
            (self.status, self.message, self.param, self.code, self.type),
        )


def _rebuild_api_error(
    status: int, message: str, param: str | None, code: str | None, type: str | None
) -> APIError:
    return APIError(status, message, param=param, code=code, type=type)


def error_body(
    message: str,
    *,
    type: str = "invalid_request_error",
    param: str | None = None,
    code: str | None = None,
) -> dict:
    """The OpenAI error shape."""
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


# ---------------------------------------------------------------------------- request models
def _as_list(value: Any) -> Any:
    return [value] if isinstance(value, str) else value


def _some_text(value: str) -> str:
    if not value.strip():
        raise PydanticCustomError("empty_input", "an empty string; every input must hold some text")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate that did not come through the JSON parser
        raise PydanticCustomError("invalid_text", "not valid Unicode text") from None
    return value


Text = Annotated[StrictStr, AfterValidator(_some_text)]
Texts = Annotated[
    list[Text],
    BeforeValidator(_as_list),
    Field(min_length=1),
    WithJsonSchema(
        {
            "anyOf": [
                {"type": "string", "minLength": 1},
                {"type": "array", "items": {"type": "string", "minLength": 1}, "minItems": 1},
            ],
            "description": "A text, or a list of texts (token-id inputs are not supported).",
        }
    ),
]


class EmbeddingRequest(BaseModel):
    """``POST /v1/embeddings``: OpenAI's embeddings request plus an optional ``instruction``."""

    model_config = ConfigDict(extra="ignore")  # e.g. OpenAI's `user`

    input: Texts
    model: StrictStr | None = Field(None, description="The served model's name (optional).")
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: StrictInt | None = Field(
        None, description="Must equal the model's dimension when given (no shortening)."
    )
    instruction: StrictStr | None = Field(
        None, description="A task instruction read before every text; counts toward its tokens."
    )


class DecodeRequest(BaseModel):
    """``POST /v1/decode``: texts -> what the frozen LLM decodes from their soft prompts."""

    model_config = ConfigDict(extra="ignore")

    input: Texts
    model: StrictStr | None = None
    instruction: StrictStr | None = None
    max_new_tokens: StrictInt | None = Field(
        None, description=f"Tokens to generate per text (default {DEFAULT_DECODE_TOKENS})."
    )


class EmbeddingData(BaseModel):
    object: Literal["embedding"] = "embedding"
    index: int
    embedding: list[float] | str


class Usage(BaseModel):
    prompt_tokens: int
    total_tokens: int
    truncated_inputs: list[int] | None = Field(
        None, description="Indices of the inputs that were cut to the token limit."
    )


class EmbeddingResponse(BaseModel):
    object: Literal["list"] = "list"
    data: list[EmbeddingData]
    model: str
    usage: Usage


class DecodedText(BaseModel):
    object: Literal["decoded_text"] = "decoded_text"
    index: int
    text: str


class DecodeResponse(BaseModel):
    object: Literal["list"] = "list"
    data: list[DecodedText]
    model: str
    usage: Usage


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int = 0
    owned_by: str = "l2vg-ray"
    dim: int
    encoder: str
    decode: bool


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorDetail


# ---------------------------------------------------------------------------- parsing
# pydantic error type -> our error code (the rest: *_type / *_parsing -> invalid_type; custom
# types such as empty_input pass through).
_ERROR_CODES = {
    "missing": "missing_required_parameter",
    "too_short": "empty_input",
    "literal_error": "invalid_value",
    "json_invalid": "invalid_json",
    "json_type": "invalid_json",
    "model_type": "invalid_json",
    "model_attributes_type": "invalid_json",
}


def _param(loc: Sequence[Any]) -> str | None:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or None


def _api_error(err: dict) -> APIError:
    kind = err["type"]
    code = _ERROR_CODES.get(kind) or (
        "invalid_type" if kind.endswith(("_type", "_parsing")) else kind
    )
    param = _param(err.get("loc", ()))
    msg = err.get("msg", "invalid")
    if code == "invalid_json":
        if kind.startswith("json"):
            message = (
                f"The request body is not valid JSON: {msg.removeprefix('Invalid JSON: ')}. "
                f"Send a UTF-8 JSON object whose strings are valid Unicode."
            )
        else:
            message = 'The request body must be a JSON object, such as {"input": "some text"}.'
        return APIError(400, message, code=code)
    if code == "missing_required_parameter":
        return APIError(400, f"Missing required parameter '{param}'.", param=param, code=code)
    hint = ""
    if code == "invalid_type" and param and param.startswith("input["):
        value = err.get("input")
        if isinstance(value, (int, list)) and not isinstance(value, bool):
            hint = " Token-id inputs are not supported; send the text."
    return APIError(400, f"'{param}': {msg}.{hint}", param=param, code=code)


def parse_request(model: type[BaseModel], body: bytes) -> Any:
    """Raw request bytes -> a validated ``model``, or an ``APIError`` (400)."""
    body = body.removeprefix(_BOM)
    if not body.strip():
        raise APIError(
            400,
            "The request body is empty; send a JSON object such as "
            '{"input": "some text", "model": "..."}.',
            code="invalid_json",
        )
    try:
        return model.model_validate_json(body)
    except ValidationError as e:
        raise _api_error(e.errors(include_url=False)[0]) from None


def body_too_large(size: int, limit: int) -> APIError:
    return APIError(
        413,
        f"The request body has {size} bytes or more, over the limit of {limit} bytes "
        f"(serve.max_request_bytes). Send fewer or shorter texts per request.",
        code="request_too_large",
    )


def check_model(model: str | None, served_model: str) -> str:
    """``model`` may be omitted; when given it must be the served model's name."""
    if model is not None and model != served_model:
        raise APIError(
            404,
            f"The model {model!r} does not exist here; this server serves "
            f"{served_model!r} (see GET /v1/models).",
            param="model",
            code="model_not_found",
        )
    return served_model


def check_items(texts: Sequence[str], limits: ServeConfig) -> None:
    if len(texts) > limits.max_items_per_request:
        raise APIError(
            400,
            f"'input' has {len(texts)} items, over the limit of {limits.max_items_per_request} per "
            f"request (serve.max_items_per_request). Split it over several requests.",
            param="input",
            code="too_many_items",
        )


def check_embedding_request(
    req: EmbeddingRequest, *, limits: ServeConfig, served_model: str, dim: int
) -> str:
    """The limits that depend on the server; returns the model name to answer with."""
    check_items(req.input, limits)
    model = check_model(req.model, served_model)
    if req.dimensions is not None and req.dimensions != dim:
        raise APIError(
            400,
            f"'dimensions'={req.dimensions} is not supported: {served_model!r} has "
            f"{dim}-dimensional embeddings and cannot shorten them. Omit 'dimensions' "
            f"or pass {dim}.",
            param="dimensions",
            code="invalid_value",
        )
    return model


def check_decode_request(
    req: DecodeRequest, *, limits: ServeConfig, served_model: str
) -> tuple[str, int]:
    """Returns (model name, max_new_tokens)."""
    check_items(req.input, limits)
    model = check_model(req.model, served_model)
    max_new = req.max_new_tokens
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
    return model, max_new


# ---------------------------------------------------------------------------- token budget
@dataclass(frozen=True)
class Fitted:
    """One text within the token budget: what is embedded and the tokens the model reads."""

    text: str
    tokens: int
    truncated: bool = False


def token_budget(encoder: Any, limits: ServeConfig) -> int:
    return min(int(limits.max_tokens_per_text), int(encoder.max_input_tokens))


def fit_texts(
    encoder: Any,
    texts: Sequence[str],
    instruction: str | None,
    *,
    limits: ServeConfig,
    params: Sequence[str] | None = None,
) -> list[Fitted | APIError]:
    """Each text within ``token_budget``: kept, cut once (truncate) or an APIError.

    One ``count_tokens`` pass for all texts (instruction included); texts over the budget get one
    tokenizer pass with offsets, are cut at the last token boundary that fits, and are counted
    again (the encoder cuts any token the join adds). ``params``: each text's name in errors.
    """
    texts = list(texts)
    params = list(params) if params is not None else [f"input[{i}]" for i in range(len(texts))]
    budget = token_budget(encoder, limits)
    counts = encoder.count_tokens(texts, instruction=instruction)
    out: list[Fitted | APIError] = [Fitted(t, int(n)) for t, n in zip(texts, counts, strict=True)]
    over = [i for i, n in enumerate(counts) if n > budget]
    if not over:
        return out
    which = (
        "serve.max_tokens_per_text"
        if budget == limits.max_tokens_per_text
        else f"the model's maximum input length ({budget})"
    )
    if not limits.truncate:
        for i in over:
            out[i] = APIError(
                413,
                f"'{params[i]}' has {counts[i]} tokens"
                + (" with the instruction" if instruction else "")
                + f", over the limit of {budget} tokens per text ({which}). Shorten it, or run "
                f"the server with serve.truncate=true.",
                param=params[i],
                code="context_length_exceeded",
            )
        return out
    enc = encoder.tokenizer(
        [texts[i] for i in over], add_special_tokens=False, return_offsets_mapping=True
    )
    cut: dict[int, str] = {}
    for i, offsets in zip(over, enc["offset_mapping"], strict=True):
        keep = len(offsets) - (counts[i] - budget)  # text tokens that fit beside the rest
        if keep < 1:
            out[i] = (
                APIError(
                    400,
                    f"The instruction takes {counts[i] - len(offsets)} of the {budget} tokens a "
                    f"text may use ({which}), leaving none for '{params[i]}'. Shorten the "
                    f"instruction.",
                    param="instruction",
                    code="instruction_too_long",
                )
                if instruction
                else APIError(
                    413,
                    f"'{params[i]}' cannot be cut to {budget} tokens ({which} is too small "
                    f"for this encoder's special tokens).",
                    param=params[i],
                    code="context_length_exceeded",
                )
            )
            continue
        cut[i] = texts[i][: offsets[keep - 1][1]]
    if cut:
        recount = encoder.count_tokens(list(cut.values()), instruction=instruction)
        for (i, text), n in zip(cut.items(), recount, strict=True):
            out[i] = Fitted(text, min(int(n), budget), truncated=True)
    return out


# ---------------------------------------------------------------------------- responses
def encode_base64(vector: np.ndarray) -> str:
    """OpenAI's base64 format: the little-endian float32 bytes of the vector."""
    return base64.b64encode(np.asarray(vector, dtype="<f4").tobytes()).decode("ascii")


def decode_base64(data: str) -> np.ndarray:
    return np.frombuffer(base64.b64decode(data), dtype="<f4")


def usage(fitted: Sequence[Fitted]) -> dict:
    n = int(sum(f.tokens for f in fitted))
    out: dict[str, Any] = {"prompt_tokens": n, "total_tokens": n}
    truncated = [i for i, f in enumerate(fitted) if f.truncated]
    if truncated:
        out["truncated_inputs"] = truncated
    return out


def embedding_response(
    vectors: np.ndarray, *, model: str, encoding_format: str, fitted: Sequence[Fitted]
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
    return {"object": "list", "data": data, "model": model, "usage": usage(fitted)}


def decode_response(decoded: Sequence[str], *, model: str, fitted: Sequence[Fitted]) -> dict:
    data = [{"object": "decoded_text", "index": i, "text": t} for i, t in enumerate(decoded)]
    return {"object": "list", "data": data, "model": model, "usage": usage(fitted)}


# ---------------------------------------------------------------------------- batched embedding
@dataclass(frozen=True)
class EmbedItem:
    """One text of one request inside a batch shared by concurrent requests."""

    request: int  # which request it belongs to (a failure stays within it)
    index: int  # its position in that request's `input`
    text: str
    instruction: str | None


EmbedResult = tuple[np.ndarray, Fitted] | APIError


def plan_batches(
    tokens: Sequence[int], *, max_batch_size: int, max_batch_tokens: int
) -> list[list[int]]:
    """Indices cut into model calls of at most ``max_batch_size`` texts and
    ``max_batch_tokens`` padded tokens (texts sorted by length; one long text still runs alone)."""
    order = sorted(range(len(tokens)), key=lambda i: tokens[i])
    batches: list[list[int]] = []
    current: list[int] = []
    for i in order:
        width = max([tokens[j] for j in current] + [tokens[i]])
        if current and (
            len(current) >= max_batch_size or width * (len(current) + 1) > max_batch_tokens
        ):
            batches.append(current)
            current = []
        current.append(i)
    if current:
        batches.append(current)
    return batches


def _embed(
    encoder: Any,
    items: Sequence[EmbedItem],
    *,
    limits: ServeConfig,
    max_batch_size: int,
    max_batch_tokens: int,
    normalize: bool,
) -> list[EmbedResult]:
    results: list[EmbedResult | None] = [None] * len(items)
    groups: dict[str | None, list[int]] = {}
    for j, item in enumerate(items):
        groups.setdefault(item.instruction, []).append(j)
    for instruction, idx in groups.items():
        fitted = fit_texts(
            encoder,
            [items[j].text for j in idx],
            instruction,
            limits=limits,
            params=[f"input[{items[j].index}]" for j in idx],
        )
        ok = [(j, f) for j, f in zip(idx, fitted, strict=True) if isinstance(f, Fitted)]
        for j, f in zip(idx, fitted, strict=True):
            if isinstance(f, APIError):
                results[j] = f
        plan = plan_batches(
            [f.tokens for _, f in ok],
            max_batch_size=max_batch_size,
            max_batch_tokens=max_batch_tokens,
        )
        for batch in plan:
            vectors = encoder.encode(
                [ok[k][1].text for k in batch],
                instruction=instruction,
                batch_size=len(batch),
                normalize=normalize,
            )
            for k, v in zip(batch, vectors, strict=True):
                results[ok[k][0]] = (v, ok[k][1])
    return results  # type: ignore[return-value]


def embed_items(
    encoder: Any,
    items: Sequence[EmbedItem],
    *,
    limits: ServeConfig,
    max_batch_size: int,
    max_batch_tokens: int,
    normalize: bool,
) -> list[EmbedResult]:
    """Token-fit and embed texts gathered from one or many requests.

    Returns per item ``(vector, Fitted)`` or the ``APIError`` of that item. A failure while
    embedding is retried request by request, so that it fails only the request it came from;
    its neighbours in the batch are answered normally.
    """
    kw = dict(
        limits=limits,
        max_batch_size=max_batch_size,
        max_batch_tokens=max_batch_tokens,
        normalize=normalize,
    )
    try:
        return _embed(encoder, items, **kw)
    except Exception:
        log.exception(
            "Embedding a batch of %d texts failed; retrying request by request", len(items)
        )
    by_request: dict[int, list[int]] = {}
    for j, item in enumerate(items):
        by_request.setdefault(item.request, []).append(j)
    results: list[EmbedResult | None] = [None] * len(items)
    for idx in by_request.values():
        try:
            part = _embed(encoder, [items[j] for j in idx], **kw)
        except Exception as e:
            log.exception("Embedding one request's %d texts failed", len(idx))
            err = APIError(
                500,
                f"Embedding this request's input failed ({type(e).__name__}); the error is in "
                f"the server log.",
                code="embedding_failed",
            )
            part = [err] * len(idx)
        for j, r in zip(idx, part, strict=True):
            results[j] = r
    return results  # type: ignore[return-value]
