"""The serving API's wire protocol: typed requests and responses, errors, limits; pure, no Ray.

Requests are pydantic models (``EmbeddingRequest``, ``DecodeRequest``) parsed from the raw body by
pydantic's own JSON parser, so that invalid UTF-8, lone surrogates (``"\\ud800"``), nesting past
its recursion limit and out-of-range numbers are parse errors: every one is a 400 with an
OpenAI-style body naming the parameter, never a 500. What depends on the served model (how many
items, the model's name, its dimension) is checked after parsing by ``check_*``. Responses are
built by ``embedding_response`` / ``decode_response`` from what the model replica returns.

The model's side (token budget, batching, running the encoder) is ``l2vg_ray.serve.core``.
"""

from __future__ import annotations

import base64
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


def check_requested_model(model: str | None, served_model: str) -> str:
    """A request's ``model``: may be omitted; when given it must be the served model's name.
    Not the config check of ``model.*`` (``l2vg_ray.config.check_model``)."""
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
    model = check_requested_model(req.model, served_model)
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
    model = check_requested_model(req.model, served_model)
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


# ---------------------------------------------------------------------------- responses
@dataclass(frozen=True)
class Fitted:
    """One text as the model read it, within the token budget: what is embedded, the tokens
    ``usage`` reports and whether it was cut (``usage.truncated_inputs``). Made by
    ``l2vg_ray.serve.core.fit_texts``."""

    text: str
    tokens: int
    truncated: bool = False


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
