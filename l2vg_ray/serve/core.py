"""The model replica's work on texts: token budget, batched embedding, decoding; pure, no Ray.

``EmbeddingModel`` (``l2vg_ray.serve.app``) holds an encoder and calls these functions; the wire
format they answer in (``Fitted``, ``APIError``) lives in ``l2vg_ray.serve.protocol``.

Token budget (``fit_texts``): a text may use ``min(serve.max_tokens_per_text, the encoder's own
max_input_tokens)`` tokens, *instruction included*. Over it, with ``serve.truncate=true`` the
text (never the instruction) is cut once, at a token boundary taken from the tokenizer's offsets,
and the response lists it in ``usage.truncated_inputs``; with ``serve.truncate=false`` the request
is answered 413 (``context_length_exceeded``). An instruction that alone fills the budget is a
400. ``usage`` counts the tokens the model actually read.

Batched embedding (``embed_items``): the texts of concurrent requests, gathered by the replica's
``@serve.batch``, are grouped by instruction, fitted to the budget and cut into model calls by
``plan_request_batches``; a failure fails only the request it came from.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from l2vg_ray.serve.protocol import APIError, Fitted

if TYPE_CHECKING:
    from l2vg_ray.config import ServeConfig

log = logging.getLogger(__name__)


# ---------------------------------------------------------------------------- token budget
def token_budget(encoder: Any, limits: ServeConfig) -> int:
    return min(int(limits.max_tokens_per_text), int(encoder.max_input_tokens))


def _uncuttable(
    tokens: int, text_tokens: int, budget: int, which: str, param: str, instruction: str | None
) -> APIError:
    """The error of a text over the budget that no cut can fit: the instruction (400), or the
    encoder's own special tokens (413), fill the budget alone."""
    if instruction:
        return APIError(
            400,
            f"The instruction takes {tokens - text_tokens} of the {budget} tokens a text may use "
            f"({which}), leaving none for '{param}'. Shorten the instruction.",
            param="instruction",
            code="instruction_too_long",
        )
    return APIError(
        413,
        f"'{param}' cannot be cut to {budget} tokens ({which} is too small for this encoder's "
        f"special tokens).",
        param=param,
        code="context_length_exceeded",
    )


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
            out[i] = _uncuttable(counts[i], len(offsets), budget, which, params[i], instruction)
        else:
            cut[i] = texts[i][: offsets[keep - 1][1]]
    if cut:
        recount = encoder.count_tokens(list(cut.values()), instruction=instruction)
        for (i, text), n in zip(cut.items(), recount, strict=True):
            out[i] = Fitted(text, min(int(n), budget), truncated=True)
    return out


# ---------------------------------------------------------------------------- batched embedding
@dataclass(frozen=True)
class EmbedItem:
    """One text of one request inside a batch shared by concurrent requests."""

    request: int  # which request it belongs to (a failure stays within it)
    index: int  # its position in that request's `input`
    text: str
    instruction: str | None


EmbedResult = tuple[np.ndarray, Fitted] | APIError


def plan_request_batches(
    tokens: Sequence[int], *, max_batch_size: int, max_batch_tokens: int
) -> list[list[int]]:
    """Indices of the texts of a serving batch cut into model calls of at most ``max_batch_size``
    texts and ``max_batch_tokens`` padded tokens (texts sorted by length; one long text still runs
    alone). Not the training plan (``l2vg_ray.train.batching.plan_batches``)."""
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
        plan = plan_request_batches(
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


# ---------------------------------------------------------------------------- decoding
def decode_texts(
    encoder: Any,
    texts: Sequence[str],
    instruction: str | None,
    *,
    limits: ServeConfig,
    max_new_tokens: int,
) -> tuple[list[Fitted], list[str]] | APIError:
    """Token-fit ``texts`` and decode them with the frozen LLM (greedy, from the soft prompts).
    A text that does not fit fails the whole request with its APIError: one generate call serves
    all of a request's texts."""
    fitted = fit_texts(encoder, texts, instruction, limits=limits)
    errors = [f for f in fitted if isinstance(f, APIError)]
    if errors:
        return errors[0]
    decoded = encoder.decode(
        [f.text for f in fitted], instruction=instruction, max_new_tokens=max_new_tokens
    )
    return fitted, decoded  # type: ignore[return-value]
