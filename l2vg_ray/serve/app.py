"""Ray Serve application: an encoder behind an OpenAI-compatible embeddings API.

    serve run l2vg_ray.serve.app:build_app config=configs/quickstart.yaml model=outputs/.../final
    serve deploy configs/serve.yaml
    l2vg serve --config configs/quickstart.yaml model=outputs/quickstart/train/final

Endpoints: ``POST /v1/embeddings`` (OpenAI-compatible, plus an optional ``instruction``),
``POST /v1/decode`` (texts -> the text the frozen LLM decodes from their soft prompts; trained
encoders only), ``GET /v1/models``, ``GET /healthz``; the OpenAPI schema is at ``/docs``.

Two deployments: ``EmbeddingServer``, the HTTP ingress (FastAPI: auth, limits, parsing, errors;
no reserved CPU), calls ``EmbeddingModel`` (the encoder, with the CPUs/GPUs and the autoscaling)
through a deployment handle; a call whose model replica dies is retried once, then answered
503. Each model replica loads the encoder in its constructor, so Serve routes only to replicas
that hold a model, and Serve's own health check (``check_health``) watches it. Texts of concurrent
requests are gathered by ``@serve.batch`` into model calls of at most ``serve.max_batch_size``
texts and ``serve.max_batch_tokens`` padded tokens; long calls run on the replica's model
thread (the event loop keeps answering meanwhile), short ones inline
(``serve.model_thread_min_chars``); a failure while embedding fails only the request it
came from. ``serve.batching=false`` makes one model call per request instead. What a request
may hold (size, time, API key) is enforced by ``l2vg_ray.serve.http.Guard``; the wire protocol
(parsing, validation, responses) lives in ``l2vg_ray.serve.protocol`` and the model's work on
texts (token budget, batching, encoding, decoding) in ``l2vg_ray.serve.core``, both pure.
Prometheus metrics (``l2vg_*``, ``l2vg_ray.serve.metrics``) go through ``ray.serve.metrics`` to
Ray's metrics endpoint. Each ingress replica builds its own FastAPI app (``build_api``) once its
constructor has run, so no app object is shared or changed after it is built.
"""

# No `from __future__ import annotations` here: FastAPI reads the handlers' annotations
# (`request: Request`) at runtime, in the replica, where the class arrives pickled by value with
# only the globals its code uses, so a string annotation could not be resolved.

import asyncio
import dataclasses
import itertools
import logging
import os
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
from omegaconf import DictConfig
from ray import serve

from l2vg_ray.config import ConfigError, L2VGConfig, ServeConfig, check_serve, load_config, typed
from l2vg_ray.registry import Registry
from l2vg_ray.serve import ServeLoadError
from l2vg_ray.serve.core import EmbedItem, EmbedResult, decode_texts, embed_items
from l2vg_ray.serve.http import GuardSettings, install_error_handlers
from l2vg_ray.serve.metrics import ServeMetrics
from l2vg_ray.serve.protocol import (
    APIError,
    DecodeRequest,
    DecodeResponse,
    EmbeddingRequest,
    EmbeddingResponse,
    ErrorResponse,
    Fitted,
    ModelList,
    check_decode_request,
    check_embedding_request,
    decode_response,
    embedding_response,
    parse_request,
)
from l2vg_ray.text_encoders import TextEncoder

log = logging.getLogger(__name__)

API_KEY_ENV = "L2VG_API_KEY"  # the API key when serve.api_key is null

# How a replica turns (cfg) into an encoder; chosen by `serve.loader`.
EncoderLoader = Callable[[L2VGConfig], TextEncoder]
ENCODER_LOADERS: Registry[EncoderLoader] = Registry("serve loader")


@ENCODER_LOADERS.register("encoder")
def _load_with_load_encoder(cfg: L2VGConfig) -> TextEncoder:
    from l2vg_ray.loading import load_encoder

    return load_encoder(cfg.serve.model, cfg)


@ENCODER_LOADERS.register("sentence-transformers")
def _load_sentence_transformer(cfg: L2VGConfig) -> TextEncoder:
    from l2vg_ray.text_encoders import SentenceTransformerEncoder

    return SentenceTransformerEncoder(str(cfg.serve.model), cache_dir=cfg.cache_dir)


# The OpenAPI entry of a JSON body parsed by `parse_request` (not by FastAPI), and the errors.
_ERRORS = {
    str(code): {"model": ErrorResponse, "description": what}
    for code, what in [
        (400, "invalid request"),
        (401, "missing or wrong API key"),
        (404, "unknown model"),
        (408, "the body did not arrive in time"),
        (413, "body or text too large"),
        (429, "the replica's queue is full (Retry-After)"),
        (503, "overloaded or not ready (Retry-After)"),
        (504, "the request took too long"),
    ]
}


def _body_schema(model: type) -> dict:
    return {
        "requestBody": {
            "required": True,
            "content": {"application/json": {"schema": model.model_json_schema()}},
        }
    }


def _replica_lost(e: BaseException) -> bool:
    """Whether a call failed because the model replica went away (killed, crashed, drained)."""
    from ray.exceptions import ActorUnavailableError, RayActorError

    return isinstance(e, (RayActorError, ActorUnavailableError))


@serve.deployment
class EmbeddingModel:
    """The model side: one encoder, one model thread, dynamic batching across requests.

    Called by ``EmbeddingServer`` through a deployment handle, once per HTTP request; its
    replicas carry the CPUs/GPUs and autoscale (``serve.min_replicas`` ... ``max_replicas``).
    """

    def __init__(self, cfg: L2VGConfig, encoder_factory: EncoderLoader | None = None) -> None:
        from l2vg_ray.torch_utils import set_threads

        self._cfg = cfg
        self._limits = s = cfg.serve
        self._batching = bool(s.batching)
        self._thread_min_chars = int(s.model_thread_min_chars)
        self._batch_size = int(s.max_batch_size)
        self._batch_tokens = int(s.max_batch_tokens)
        self._normalize = bool(s.normalize)
        self._max_queued = int(s.max_queued_texts)
        self._queued = 0
        self._metrics = ServeMetrics()
        # Loading, decoding and long embedding calls run on this thread, short embedding calls on
        # the event loop itself; the lock keeps model and tokenizer calls one at a time (fast
        # tokenizers are not safe to share across threads).
        self._model_thread = ThreadPoolExecutor(1, thread_name_prefix="l2vg-model")
        self._model_lock = asyncio.Lock()
        self._embed_batch.set_max_batch_size(self._batch_size)
        self._embed_batch.set_batch_wait_timeout_s(float(s.batch_wait_timeout_s))
        loader = encoder_factory or ENCODER_LOADERS.get(str(s.loader))
        set_threads(s.num_cpus)
        started = time.perf_counter()
        # Loaded here, so that Serve marks the replica ready (and routes to it) only with a model.
        self._encoder: TextEncoder = self._model_thread.submit(loader, self._cfg).result()
        if not getattr(self._encoder.tokenizer, "is_fast", False):
            raise ConfigError(
                f"Serving {self._encoder.name!r} needs a fast (Rust) tokenizer for one-pass "
                f"truncation; its tokenizer is {type(self._encoder.tokenizer).__name__}."
            )
        log.info(
            "Loaded %s (dim %d) in %.1fs",
            self._encoder.name,
            self._encoder.dim,
            time.perf_counter() - started,
        )

    def check_health(self) -> None:
        """Serve's health check: the model thread still takes work."""
        self._model_thread.submit(lambda: None).result(timeout=30)

    async def info(self) -> dict[str, Any]:
        from l2vg_ray.method.model import can_decode

        return {
            "dim": int(self._encoder.dim),
            "encoder": str(self._encoder.name),
            "decode": can_decode(self._encoder),
            "pid": os.getpid(),
        }

    async def _in_model_thread(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._model_thread, lambda: fn(*args, **kwargs))

    def _embed_items(self, items: list[EmbedItem]) -> list[EmbedResult]:
        self._metrics.on_model_call(len(items))
        return embed_items(
            self._encoder,
            items,
            limits=self._limits,
            max_batch_size=self._batch_size,
            max_batch_tokens=self._batch_tokens,
            normalize=self._normalize,
        )

    async def _run_embed(self, items: list[EmbedItem]) -> list[EmbedResult]:
        # A long call goes to the model thread (the loop stays free); a short one runs inline,
        # so that requests arriving meanwhile queue up and fill the next batch.
        async with self._model_lock:
            if sum(len(it.text) for it in items) >= self._thread_min_chars:
                return await self._in_model_thread(self._embed_items, items)
            return self._embed_items(items)

    @serve.batch  # its size and wait are set from serve.* in the constructor
    async def _embed_batch(self, items: list[EmbedItem]) -> list[EmbedResult]:
        return await self._run_embed(items)

    def _admit(self, n: int) -> None:
        if self._queued + n > self._max_queued:
            raise APIError(
                429,
                f"This replica has {self._queued} texts queued (serve.max_queued_texts="
                f"{self._max_queued}); retry after a moment or send fewer texts at once.",
                code="server_busy",
                type="server_error",
            )
        self._queued += n
        self._metrics.queued.set(self._queued)

    def _release(self, n: int) -> None:
        self._queued -= n
        self._metrics.queued.set(self._queued)

    async def embed(self, items: list[EmbedItem]) -> list[EmbedResult] | APIError:
        """One request's texts -> per text (vector, Fitted) or its APIError."""
        try:
            self._admit(len(items))
        except APIError as e:
            return e
        try:
            if self._batching:
                # Each text joins a model batch shared with concurrent requests. A long list
                # enters the queue one batch-worth at a time, so that the texts of requests
                # arriving meanwhile are batched between its waves instead of waiting behind it.
                results: list[EmbedResult] = []
                for s in range(0, len(items), self._batch_size):
                    wave = items[s : s + self._batch_size]
                    results += await asyncio.gather(*(self._embed_batch(it) for it in wave))
            else:
                results = await self._run_embed(items)
        finally:
            self._release(len(items))
        tokens = sum(r[1].tokens for r in results if not isinstance(r, APIError))
        if tokens:  # a Ray counter refuses inc(0)
            self._metrics.tokens.inc(tokens)
        return results

    async def decode(
        self, texts: list[str], instruction: str | None, max_new_tokens: int
    ) -> tuple[list[Fitted], list[str]] | APIError:
        try:
            self._admit(len(texts))
        except APIError as e:
            return e
        try:
            async with self._model_lock:  # generation is long: on the thread, loop stays free
                return await self._in_model_thread(
                    decode_texts,
                    self._encoder,
                    texts,
                    instruction,
                    limits=self._limits,
                    max_new_tokens=max_new_tokens,
                )
        finally:
            self._release(len(texts))


def build_api(server: "EmbeddingServer") -> FastAPI:
    """A new FastAPI app whose routes call ``server``'s handlers, guarded by ``server.guard``.

    Called once per ingress replica (``__serve_build_asgi_app__``), after its constructor: the app
    is built from the replica's own settings instead of a module-level app changed in place.
    """
    api = FastAPI(
        title="l2vg-ray",
        description="LLM2Vec-Gen embeddings behind an OpenAI-compatible API.",
        version="0.2.0",
    )
    install_error_handlers(api)
    api.state.guard = server.guard
    api.post(
        "/v1/embeddings",
        response_model=EmbeddingResponse,
        responses=_ERRORS,
        openapi_extra=_body_schema(EmbeddingRequest),
    )(server.embeddings)
    api.post(
        "/v1/decode",
        response_model=DecodeResponse,
        responses=_ERRORS,
        openapi_extra=_body_schema(DecodeRequest),
    )(server.decode)
    api.get("/v1/models", response_model=ModelList, responses=_ERRORS)(server.models)
    api.get("/healthz")(server.healthz)
    return api


@serve.deployment
@serve.ingress()  # the app comes from __serve_build_asgi_app__, per replica
class EmbeddingServer:
    """The HTTP side: auth, limits, parsing, errors and request metrics; the model work goes to
    ``EmbeddingModel`` through a deployment handle. A call whose model replica dies is retried
    once (embedding and decoding are idempotent), then answered 503 ``model_unavailable``.
    Its routes are the handlers below, mounted on the app ``build_api`` makes for it."""

    def __init__(self, cfg: L2VGConfig, model: Any) -> None:
        self._cfg = cfg
        self._limits = s = cfg.serve
        self._model_name = str(s.model_name)
        self._request_ids = itertools.count()
        self._metrics = ServeMetrics()
        self.guard = GuardSettings(
            api_key=str(s.api_key) if s.api_key else None,
            max_request_bytes=self._limits.max_request_bytes,
            body_timeout_s=float(s.body_timeout_s),
            request_timeout_s=float(s.request_timeout_s),
            on_response=self._metrics.on_response,
        )
        self._model = model
        self._cached_info: dict[str, Any] | None = None

    def __serve_build_asgi_app__(self) -> FastAPI:
        """Ray Serve calls this once, after ``__init__``, for the replica's ASGI app."""
        return build_api(self)

    async def _info(self) -> dict[str, Any]:
        """The model's dim, name and abilities (asked once; a constructor cannot await)."""
        if self._cached_info is None:
            self._cached_info = await self._call("info")
        return self._cached_info

    async def _call(self, method: str, *args: Any) -> Any:
        for attempt in (1, 2):
            try:
                result = await getattr(self._model, method).remote(*args)
            except Exception as e:
                if not _replica_lost(e):
                    raise
                log.warning(
                    "A model replica went away during %s (attempt %d): %s",
                    method,
                    attempt,
                    type(e).__name__,
                )
                continue
            if isinstance(result, APIError):
                raise result
            return result
        raise APIError(
            503,
            "The model replica serving this request stopped and is being replaced; retry shortly.",
            code="model_unavailable",
        )

    async def embeddings(self, request: Request) -> JSONResponse:
        req = parse_request(EmbeddingRequest, await request.body())
        info = await self._info()
        model = check_embedding_request(
            req, limits=self._limits, served_model=self._model_name, dim=info["dim"]
        )
        rid = next(self._request_ids)
        items = [
            EmbedItem(rid, i, text, req.instruction or None) for i, text in enumerate(req.input)
        ]
        results = await self._call("embed", items)
        errors = [r for r in results if isinstance(r, APIError)]
        if errors:
            raise errors[0]
        return JSONResponse(
            embedding_response(
                np.stack([v for v, _ in results]),
                model=model,
                encoding_format=req.encoding_format,
                fitted=[f for _, f in results],
            )
        )

    async def decode(self, request: Request) -> JSONResponse:
        req = parse_request(DecodeRequest, await request.body())
        model, max_new = check_decode_request(
            req, limits=self._limits, served_model=self._model_name
        )
        info = await self._info()
        if not info["decode"]:
            raise APIError(
                400,
                f"The served encoder {info['encoder']!r} cannot decode: only a trained "
                f"LLM2Vec-Gen encoder folder whose training had the reconstruction term "
                f"(train.recon_weight > 0) can. Use /v1/embeddings.",
                code="decode_not_supported",
            )
        fitted, decoded = await self._call("decode", req.input, req.instruction or None, max_new)
        return JSONResponse(decode_response(decoded, model=model, fitted=fitted))

    async def models(self) -> JSONResponse:
        info = await self._info()
        card = {
            "id": self._model_name,
            "object": "model",
            "created": 0,
            "owned_by": "l2vg-ray",
            "dim": info["dim"],
            "encoder": info["encoder"],
            "decode": info["decode"],
        }
        return JSONResponse({"object": "list", "data": [card]})

    async def healthz(self) -> JSONResponse:
        """200 while a model replica answers (within 10 s), else 503 ``model_unavailable``."""
        try:
            info = await asyncio.wait_for(self._call("info"), 10.0)
        except (asyncio.TimeoutError, APIError):
            raise APIError(
                503, "No model replica answered within 10 s.", code="model_unavailable"
            ) from None
        return JSONResponse({"status": "ok", "model": self._model_name, "dim": info["dim"]})


def deployment_options(serve_cfg: Any) -> dict[str, Any]:
    """Ray Serve deployment options from ``cfg.serve`` (autoscaling and resources). Custom
    resources (``serve.resources``) make pending replicas autoscaler demand for the node type
    that offers them."""
    s = serve_cfg
    check_serve(s)  # a section built in code (build_app args) fails here, naming the key
    actor: dict[str, Any] = {"num_cpus": float(s.num_cpus), "num_gpus": float(s.num_gpus)}
    if s.resources:
        actor["resources"] = {str(k): float(v) for k, v in s.resources.items()}
    return {
        "autoscaling_config": {
            "min_replicas": int(s.min_replicas),
            "initial_replicas": max(1, int(s.min_replicas)),
            "max_replicas": int(s.max_replicas),
            "target_ongoing_requests": float(s.target_ongoing_requests),
            "upscale_delay_s": float(s.upscale_delay_s),
            "downscale_delay_s": float(s.downscale_delay_s),
        },
        "ray_actor_options": actor,
        "max_ongoing_requests": int(s.max_ongoing_requests),
        "max_queued_requests": int(s.max_queued_requests),
        "max_constructor_retry_count": max(1, int(s.load_retries) + 1),
        "health_check_period_s": 10.0,
        "health_check_timeout_s": 60.0,
        "logging_config": {"enable_access_log": bool(s.access_log)},
    }


def ingress_options(serve_cfg: Any) -> dict[str, Any]:
    """The HTTP ingress: no reserved CPU (it parses and forwards), as many replicas as the model
    has at least, and room for every request the model replicas may hold."""
    s = serve_cfg
    return {
        "num_replicas": max(1, int(s.min_replicas)),
        "ray_actor_options": {"num_cpus": 0.0},
        "max_ongoing_requests": int(s.max_ongoing_requests) * max(1, int(s.max_replicas)),
        "logging_config": {"enable_access_log": bool(s.access_log)},
    }


def build_application(
    cfg: DictConfig, *, encoder_factory: EncoderLoader | None = None
) -> serve.Application:
    """The bound Serve application for ``cfg`` (the encoder is loaded later, in each replica)."""
    if encoder_factory is None:
        ENCODER_LOADERS.get(str(cfg.serve.loader))  # unknown loader: fail here, listing the names
    options = deployment_options(cfg.serve)
    c = typed(cfg)
    model = Path(c.serve.model).expanduser()
    # The key travels to the replicas only, never into a saved config.
    c = dataclasses.replace(c, serve=dataclasses.replace(
        c.serve,
        # replicas may run in another working directory
        model=str(model.resolve()) if model.exists() else c.serve.model,
        api_key=c.serve.api_key or os.environ.get(API_KEY_ENV) or None,
    ))
    model = EmbeddingModel.options(**options).bind(c, encoder_factory)
    return EmbeddingServer.options(**ingress_options(cfg.serve)).bind(c, model)


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


def _start_serve(
    host: str, port: int, *, access_log: bool = True, request_timeout_s: float | None = None,
    proxy_location: str = "EveryNode",
) -> tuple[str, int]:
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
    http_options: dict[str, Any] = {"host": host, "port": port}
    if request_timeout_s:  # the proxy's backstop behind the replica's own 504
        http_options["request_timeout_s"] = float(request_timeout_s) + 10.0
    serve.start(
        http_options=http_options,
        proxy_location=proxy_location,
        # The controller's and proxies' own INFO lines (deployments, replicas, routes) go to
        # Ray's log files; request access logs follow serve.access_log.
        logging_config={"enable_access_log": access_log, "log_level": "WARNING"},
    )
    return host, port


def wait_until_ready(url: str, *, timeout_s: float) -> dict:
    """Poll ``GET {url}/healthz`` until 200 (the proxy may need a moment to route a new app)."""
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
            last = f"HTTP {r.status_code}: {r.text[:200]}"
        time.sleep(0.5)
    raise TimeoutError(
        f"{url}/healthz was not ready after {timeout_s:.0f}s ({last}). Raise "
        f"serve.ready_timeout_s, or check the replica logs."
    )


def run_serve(
    cfg: L2VGConfig, *, blocking: bool = True, encoder_factory: EncoderLoader | None = None
) -> dict:
    """Deploy the app on the connected Ray cluster and wait until it answers.

    ``blocking=True`` prints the URL and serves until Ctrl-C, then shuts Serve down;
    ``blocking=False`` returns at once (the caller calls ``ray.serve.shutdown()`` or
    ``serve.delete(result["app_name"])`` when done).
    """
    cfg = typed(cfg)  # a DictConfig from load_config is accepted (checked there)
    s = cfg.serve
    app = build_application(cfg, encoder_factory=encoder_factory)
    host, port = _start_serve(
        str(s.host),
        int(s.port),
        access_log=bool(s.access_log),
        request_timeout_s=float(s.request_timeout_s),
        proxy_location=str(s.proxy_location),
    )
    try:  # returns once a replica holds the model (it loads in the constructor)
        serve.run(app, name=str(s.app_name), route_prefix=str(s.route_prefix), blocking=False)
    except RuntimeError as e:
        if blocking:
            serve.shutdown()
        lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
        raise ServeLoadError(
            f"The served model {str(s.model)!r} failed to load ({s.load_retries} retries); the "
            f"cause: {lines[-1] if lines else e}"
        ) from e
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
