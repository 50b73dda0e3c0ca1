"""Ray Serve application: an encoder behind an OpenAI-compatible embeddings API.

    serve run l2vg_ray.serve.app:build_app config=configs/quickstart.yaml model=outputs/.../final
    serve deploy configs/serve.yaml
    l2vg serve --config configs/quickstart.yaml model=outputs/quickstart/train/final

Endpoints: ``POST /v1/embeddings`` (OpenAI-compatible, plus an optional ``instruction``),
``POST /v1/decode`` (texts -> the text the frozen LLM decodes from their soft prompts; trained
encoders only), ``GET /v1/models``, ``GET /healthz`` (503 until the model has loaded).

Each replica loads the encoder once, in a background thread, and answers 503 while loading.
Texts of concurrent requests are gathered by ``@serve.batch`` into model calls of at most
``serve.max_batch_size`` texts (a long list in one request is split the same way);
``serve.batching=false`` makes one model call per request instead. ``/healthz`` also reports
counters (requests, texts, model calls, seconds) from which the mean batch size follows. Validation lives in
``l2vg_ray.serve.protocol`` (pure) and error plumbing in ``l2vg_ray.serve.http``.
"""

# No `from __future__ import annotations` here: Ray Serve's class-based FastAPI ingress resolves
# the endpoint annotations (`request: Request`) at runtime and cannot resolve strings.

import asyncio
import dataclasses
import logging
import signal
import socket
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from omegaconf import DictConfig, OmegaConf
from ray import serve

from l2vg_ray.config import ConfigError, ServeConfig, load_config, to_dict
from l2vg_ray.encoders import TextEncoder
from l2vg_ray.registry import Registry
from l2vg_ray.serve.http import install_error_handlers, read_body
from l2vg_ray.serve.protocol import (
    APIError,
    EmbedItem,
    Limits,
    apply_token_limit,
    decode_response,
    embed_items,
    embedding_response,
    parse_decode_request,
    parse_embedding_request,
    parse_json_body,
)

log = logging.getLogger(__name__)

# How a replica turns (cfg) into an encoder; chosen by `serve.loader`.
EncoderLoader = Callable[[DictConfig], TextEncoder]
ENCODER_LOADERS: Registry[EncoderLoader] = Registry("serve loader")


@ENCODER_LOADERS.register("encoder")
def _load_with_load_encoder(cfg: DictConfig) -> TextEncoder:
    from l2vg_ray.loading import load_encoder

    return load_encoder(cfg.serve.model, cfg)


@ENCODER_LOADERS.register("sentence-transformers")
def _load_sentence_transformer(cfg: DictConfig) -> TextEncoder:
    from l2vg_ray.encoders import SentenceTransformerEncoder

    return SentenceTransformerEncoder(str(cfg.serve.model), cache_dir=cfg.cache_dir)


api = FastAPI(
    title="l2vg-ray",
    description="LLM2Vec-Gen embeddings behind an OpenAI-compatible API.",
    version="0.1.0",
)
install_error_handlers(api)


@serve.deployment
@serve.ingress(api)
class EmbeddingServer:
    """One replica: one encoder, one model thread, dynamic batching across requests."""

    def __init__(self, cfg: dict, encoder_factory: EncoderLoader | None = None) -> None:
        self._cfg = OmegaConf.create(cfg)
        s = self._cfg.serve
        self._model_name = str(s.model_name)
        self._limits = Limits.from_config(s)
        self._batching = bool(s.batching)
        self._batch_size = int(s.max_batch_size)
        self._normalize = bool(s.normalize)
        self._num_threads = max(1, int(round(float(s.num_cpus))))
        # Loading and decoding run on this thread (the event loop stays responsive meanwhile);
        # embedding runs on the event loop (see _embed_batch). The lock keeps model and tokenizer
        # calls one at a time: fast tokenizers are not safe to share across threads.
        self._model_thread = ThreadPoolExecutor(1, thread_name_prefix="l2vg-model")
        self._model_lock = asyncio.Lock()
        self._encoder: TextEncoder | None = None
        self._load_error: str | None = None
        # Served requests, texts and model calls (texts / model_calls = the mean batch size).
        self._stats = {
            "requests": 0,
            "texts": 0,
            "model_calls": 0,
            "model_seconds": 0.0,
            "request_seconds": 0.0,  # time embedding requests spent inside this replica
        }
        self._embed_batch.set_max_batch_size(self._batch_size)
        self._embed_batch.set_batch_wait_timeout_s(float(s.batch_wait_timeout_s))
        loader = encoder_factory or ENCODER_LOADERS.get(str(s.loader))
        self._model_thread.submit(self._load, loader)

    def _load(self, loader: EncoderLoader) -> None:
        import torch

        torch.set_num_threads(self._num_threads)
        started = time.perf_counter()
        try:
            self._encoder = loader(self._cfg)
        except Exception as e:  # reported by /healthz and run_serve, not swallowed
            log.exception("Loading %r failed", self._cfg.serve.model)
            self._load_error = f"{type(e).__name__}: {e}"
        else:
            log.info(
                "Loaded %s (dim %d) in %.1fs",
                self._encoder.name,
                self._encoder.dim,
                time.perf_counter() - started,
            )

    def _ready_encoder(self) -> TextEncoder:
        if self._encoder is not None:
            return self._encoder
        if self._load_error is not None:
            raise APIError(
                503, f"The model failed to load: {self._load_error}", code="model_load_failed"
            )
        raise APIError(
            503,
            "The model is still loading; retry shortly (GET /healthz turns 200 when it is ready).",
            code="model_loading",
        )

    async def _in_model_thread(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._model_thread, lambda: fn(*args, **kwargs))

    async def _json_body(self, request: Request) -> dict:
        body = await read_body(request, max_bytes=self._limits.max_request_bytes)
        return parse_json_body(body, max_bytes=self._limits.max_request_bytes)

    def _decode(
        self,
        encoder: TextEncoder,
        decode_fn: Callable[..., list[str]],
        texts: list[str],
        instruction: str | None,
        max_new_tokens: int,
    ) -> tuple[list[str], list[int], list[str]]:
        texts, counts = apply_token_limit(
            texts,
            encoder.count_tokens,
            max_tokens=self._limits.max_tokens_per_text,
            truncate=self._limits.truncate,
        )
        decoded = decode_fn(texts, instruction=instruction, max_new_tokens=max_new_tokens)
        return texts, counts, decoded

    def _embed_items(self, items: list[EmbedItem]) -> list[tuple[np.ndarray, int] | APIError]:
        # Token limits and encoding in one pass (call with self._model_lock held).
        started = time.perf_counter()
        try:
            return embed_items(
                self._encoder,
                items,
                max_tokens=self._limits.max_tokens_per_text,
                truncate=self._limits.truncate,
                batch_size=self._batch_size,
                normalize=self._normalize,
            )
        finally:
            self._stats["model_calls"] += 1
            self._stats["texts"] += len(items)
            self._stats["model_seconds"] += time.perf_counter() - started

    @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.01)
    async def _embed_batch(self, items: list[EmbedItem]) -> list[tuple[np.ndarray, int] | APIError]:
        # The model runs right here on the event loop thread, not in the model thread: CPU-bound
        # work in a second thread of this process fights the event loop for the GIL, which then
        # admits requests so slowly that batches stay small (bench/serve.py, 32 clients: 3-4
        # texts per model call that way, 12 this way). Requests keep queueing in Ray meanwhile.
        async with self._model_lock:
            return self._embed_items(items)

    @api.post("/v1/embeddings")
    async def embeddings(self, request: Request) -> JSONResponse:
        obj = await self._json_body(request)
        encoder = self._ready_encoder()
        req = parse_embedding_request(
            obj, limits=self._limits, served_model=self._model_name, dim=encoder.dim
        )
        started = time.perf_counter()
        items = [(i, text, req.instruction) for i, text in enumerate(req.texts)]
        try:
            if self._batching:  # each text joins a model batch shared with concurrent requests
                results = await asyncio.gather(*(self._embed_batch(item) for item in items))
            else:
                async with self._model_lock:
                    results = self._embed_items(items)
        finally:
            self._stats["requests"] += 1
            self._stats["request_seconds"] += time.perf_counter() - started
        errors = [r for r in results if isinstance(r, APIError)]
        if errors:
            raise errors[0]
        return JSONResponse(
            embedding_response(
                np.stack([v for v, _ in results]),
                model=req.model,
                encoding_format=req.encoding_format,
                token_counts=[n for _, n in results],
            )
        )

    @api.post("/v1/decode")
    async def decode(self, request: Request) -> JSONResponse:
        obj = await self._json_body(request)
        encoder = self._ready_encoder()
        req = parse_decode_request(obj, limits=self._limits, served_model=self._model_name)
        decode_fn = getattr(encoder, "decode", None)
        if not callable(decode_fn):
            raise APIError(
                400,
                f"The served encoder {encoder.name!r} cannot decode: only a trained "
                f"LLM2Vec-Gen encoder folder can. Use /v1/embeddings.",
                code="decode_not_supported",
            )
        async with self._model_lock:  # generation is long: keep the event loop free meanwhile
            texts, counts, decoded = await self._in_model_thread(
                self._decode, encoder, decode_fn, req.texts, req.instruction, req.max_new_tokens
            )
        return JSONResponse(decode_response(decoded, model=req.model, token_counts=counts))

    @api.get("/v1/models")
    async def models(self) -> JSONResponse:
        card: dict[str, Any] = {
            "id": self._model_name,
            "object": "model",
            "created": 0,
            "owned_by": "l2vg-ray",
        }
        if self._encoder is not None:
            card.update(
                dim=self._encoder.dim,
                encoder=self._encoder.name,
                decode=callable(getattr(self._encoder, "decode", None)),
            )
        return JSONResponse({"object": "list", "data": [card]})

    @api.get("/healthz")
    async def healthz(self) -> JSONResponse:
        encoder = self._ready_encoder()
        return JSONResponse(
            {"status": "ok", "model": self._model_name, "dim": encoder.dim, "stats": self._stats}
        )


def deployment_options(serve_cfg: Any) -> dict[str, Any]:
    """Ray Serve deployment options from ``cfg.serve`` (autoscaling and resources)."""
    s = serve_cfg
    if not 0 <= s.min_replicas <= s.max_replicas or s.max_replicas < 1:
        raise ConfigError(
            f"serve.min_replicas={s.min_replicas} and serve.max_replicas="
            f"{s.max_replicas}: need 0 <= min_replicas <= max_replicas, max >= 1."
        )
    if s.max_batch_size < 1:
        raise ConfigError(f"serve.max_batch_size must be >= 1, got {s.max_batch_size}.")
    if s.max_ongoing_requests < 1:
        raise ConfigError(f"serve.max_ongoing_requests must be >= 1, got {s.max_ongoing_requests}.")
    if not 0 < s.target_ongoing_requests <= s.max_ongoing_requests:
        raise ConfigError(
            f"serve.target_ongoing_requests={s.target_ongoing_requests} must be > 0 "
            f"and <= serve.max_ongoing_requests={s.max_ongoing_requests}."
        )
    return {
        "autoscaling_config": {
            "min_replicas": int(s.min_replicas),
            "initial_replicas": max(1, int(s.min_replicas)),
            "max_replicas": int(s.max_replicas),
            "target_ongoing_requests": float(s.target_ongoing_requests),
        },
        "ray_actor_options": {"num_cpus": float(s.num_cpus), "num_gpus": float(s.num_gpus)},
        "max_ongoing_requests": int(s.max_ongoing_requests),
        "logging_config": {"enable_access_log": bool(s.access_log)},
    }


def build_application(
    cfg: DictConfig, *, encoder_factory: EncoderLoader | None = None
) -> serve.Application:
    """The bound Serve application for ``cfg`` (the encoder is loaded later, in each replica)."""
    if encoder_factory is None:
        ENCODER_LOADERS.get(str(cfg.serve.loader))  # unknown loader: fail here, listing the names
    options = deployment_options(cfg.serve)
    plain = to_dict(cfg)
    model = Path(plain["serve"]["model"]).expanduser()
    if model.exists():  # replicas may run in another working directory
        plain["serve"]["model"] = str(model.resolve())
    return EmbeddingServer.options(**options).bind(plain, encoder_factory)


def build_app(args: dict) -> serve.Application:
    """Application builder for ``serve run l2vg_ray.serve.app:build_app key=value ...``.

    ``args``: ``config`` (an experiment YAML, optional) and config overrides; ``model``, ``port``,
    ``host`` and the other ``serve.*`` field names may be given without the ``serve.`` prefix.
    """
    args = dict(args or {})
    path = args.pop("config", None)
    serve_fields = {f.name for f in dataclasses.fields(ServeConfig)}
    overrides = []
    for key, value in args.items():
        full = f"serve.{key}" if key in serve_fields else key
        if isinstance(value, bool):
            value = str(value).lower()
        overrides.append(f"{full}={value}")
    return build_application(load_config(path, overrides))


def _free_port(host: str) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def _start_serve(host: str, port: int, *, access_log: bool = True) -> tuple[str, int]:
    """Start Serve's HTTP proxy on host:port, or reuse the running one (whose address wins)."""
    from ray.serve.context import _get_global_client

    client = _get_global_client(raise_if_no_controller_running=False)
    if client is not None:
        running = (str(client.http_config.host), int(client.http_config.port))
        if port and running != (host, port):
            log.warning(
                "Ray Serve already listens on %s:%d; serving there, not on %s:%d.",
                *running,
                host,
                port,
            )
        return running
    port = port or _free_port(host)
    serve.start(
        http_options={"host": host, "port": port},
        logging_config={"enable_access_log": access_log},
    )
    return host, port


def wait_until_ready(url: str, *, timeout_s: float) -> dict:
    """Poll ``GET {url}/healthz`` until 200; raise if the model failed to load or on timeout."""
    import httpx

    deadline = time.monotonic() + timeout_s
    last = "no answer yet"
    while time.monotonic() < deadline:
        try:
            r = httpx.get(f"{url}/healthz", timeout=5.0)
        except httpx.TransportError as e:
            last = f"{type(e).__name__}: {e}"
        else:
            if r.status_code == 200:
                return r.json()
            try:
                err = r.json()["error"]
            except (ValueError, KeyError, TypeError):
                err = {"message": r.text[:200], "code": None}
            if err.get("code") == "model_load_failed":
                raise RuntimeError(f"The served model failed to load: {err['message']}")
            last = f"HTTP {r.status_code}: {err.get('message')}"
        time.sleep(0.5)
    raise TimeoutError(
        f"{url}/healthz was not ready after {timeout_s:.0f}s ({last}). Raise "
        f"serve.ready_timeout_s, or check the replica logs."
    )


def run_serve(
    cfg: DictConfig, *, blocking: bool = True, encoder_factory: EncoderLoader | None = None
) -> dict:
    """Deploy the app on the connected Ray cluster and wait until it answers.

    ``blocking=True`` prints the URL and serves until Ctrl-C, then shuts Serve down;
    ``blocking=False`` returns at once (the caller calls ``ray.serve.shutdown()`` or
    ``serve.delete(result["app_name"])`` when done).
    """
    s = cfg.serve
    app = build_application(cfg, encoder_factory=encoder_factory)
    host, port = _start_serve(str(s.host), int(s.port), access_log=bool(s.access_log))
    serve.run(app, name=str(s.app_name), route_prefix=str(s.route_prefix), blocking=False)
    url = f"http://{host}:{port}{str(s.route_prefix).rstrip('/')}"
    try:
        health = wait_until_ready(url, timeout_s=float(s.ready_timeout_s))
    except Exception:
        if blocking:
            serve.shutdown()
        raise
    result = {
        "url": url,
        "embeddings_url": f"{url}/v1/embeddings",
        "model": health["model"],
        "dim": health["dim"],
        "app_name": str(s.app_name),
    }
    if not blocking:
        return result
    print(
        f"Serving {result['model']} (dim {result['dim']}) at {url}  - POST {url}/v1/embeddings; "
        f"Ctrl-C to stop.",
        flush=True,
    )
    previous = _stop_on_sigterm()
    try:
        while True:
            time.sleep(1.0)
    except KeyboardInterrupt:
        print("Shutting down Ray Serve.", flush=True)
    finally:
        serve.shutdown()
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
    return result


def _stop_on_sigterm() -> Any:
    """Treat SIGTERM (``ray job stop``, ``kill``) like Ctrl-C so that Serve is shut down."""
    if threading.current_thread() is not threading.main_thread():
        return None

    def _raise(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    return signal.signal(signal.SIGTERM, _raise)
