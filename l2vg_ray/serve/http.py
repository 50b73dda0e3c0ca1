"""FastAPI plumbing shared by the Ray Serve app and the no-Ray peer: errors in the OpenAI shape,
and the guard every request passes.

``install_error_handlers(app)`` makes every failure answer ``{"error": {...}}``: our
``APIError``, FastAPI's request validation (400), unknown routes and methods (404/405), and -
through an ASGI middleware - any unexpected exception (500, message without a stack trace; the
trace goes to the server log).

``Guard`` (ASGI middleware, settings in ``app.state.guard``) bounds what one request may hold:
the API key (401 without it, on every route but the open ones), the body size (413, before and
while reading), the time to send the body (408: a client that declares more bytes than it sends
frees its slot) and the time to answer (504). It reports each answer (route, status, seconds)
to ``GuardSettings.on_response``.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from l2vg_ray.serve.protocol import APIError, body_too_large, error_body

log = logging.getLogger(__name__)

INTERNAL_ERROR = "The server failed to process the request (the error is in the server log)."


def error_response(err: APIError) -> JSONResponse:
    headers = {"Retry-After": "1"} if err.status in (429, 503) else None
    if err.status == 401:
        headers = {"WWW-Authenticate": "Bearer"}
    return JSONResponse(err.body(), status_code=err.status, headers=headers)


class CatchAllErrors:
    """ASGI middleware: an unexpected exception becomes a 500 in the OpenAI error shape."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def send_tracking(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, receive, send_tracking)
        except Exception:
            log.exception("Unhandled error in %s %s", scope.get("method"), scope.get("path"))
            if started:  # too late for a clean error response
                raise
            response = JSONResponse(
                error_body(INTERNAL_ERROR, type="server_error"), status_code=500
            )
            await response(scope, receive, send)


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError) -> JSONResponse:
        return error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = exc.errors()
        first = errors[0] if errors else {}
        loc = [str(p) for p in first.get("loc", ()) if p != "body"]
        param = ".".join(loc) or None
        message = f"Invalid request: {first.get('msg', 'validation failed')}" + (
            f" (parameter '{param}')." if param else "."
        )
        return JSONResponse(
            error_body(message, param=param, code="invalid_request"), status_code=400
        )

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        status = exc.status_code
        if status == 404:
            message = f"No route {request.method} {request.url.path}; see GET /v1/models, POST /v1/embeddings, POST /v1/decode, GET /healthz."
        elif status == 405:
            message = f"Method {request.method} is not allowed on {request.url.path}."
        else:
            message = str(exc.detail)
        kind = "invalid_request_error" if status < 500 else "server_error"
        return JSONResponse(error_body(message, type=kind), status_code=status, headers=exc.headers)

    app.add_middleware(CatchAllErrors)
    app.add_middleware(Guard)  # outermost: added last


@dataclass(frozen=True)
class GuardSettings:
    """What ``Guard`` enforces; ``None`` / 0 turns a check off."""

    api_key: str | None = None
    max_request_bytes: int = 0
    body_timeout_s: float = 0.0
    request_timeout_s: float = 0.0
    # Health and the API docs need no key (the schema holds no data).
    open_paths: tuple[str, ...] = ("/healthz", "/docs", "/openapi.json", "/redoc")
    on_response: Callable[[str, int, float], None] | None = None


def unauthorized(reason: str) -> APIError:
    return APIError(
        401,
        f"{reason} Send the server's API key as 'Authorization: Bearer <key>' "
        f"(serve.api_key or L2VG_API_KEY on the server).",
        code="invalid_api_key",
    )


def auth_error(headers: dict[bytes, bytes], key: str) -> APIError | None:
    """The 401 for a request without ``Authorization: Bearer <key>``; None when it has it."""
    header = headers.get(b"authorization", b"").decode("latin-1")
    scheme, _, token = header.partition(" ")
    if not header:
        return unauthorized("No API key was sent.")
    if scheme.lower() != "bearer" or not hmac.compare_digest(
        token.strip().encode("utf-8", "replace"), key.encode("utf-8")
    ):
        return unauthorized("The API key is not valid.")
    return None


class Guard:
    """ASGI middleware: auth, body size and time, answer time, per-answer reporting."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        settings = getattr(getattr(scope.get("app"), "state", None), "guard", None)
        if scope["type"] != "http" or settings is None:
            await self.app(scope, receive, send)
            return
        started_at = time.perf_counter()
        root = scope.get("root_path", "")
        path = scope.get("path", "")
        route = path[len(root) :] if root and path.startswith(root) else path
        status = 500
        started = False

        async def tracked_send(message: Message) -> None:
            nonlocal status, started
            if message["type"] == "http.response.start":
                status, started = int(message["status"]), True
            await send(message)

        async def answer(err: APIError) -> None:
            await error_response(err)(scope, receive, tracked_send)

        try:
            headers = dict(scope.get("headers") or ())
            if settings.api_key and route not in settings.open_paths:
                err = auth_error(headers, settings.api_key)
                if err is not None:
                    await answer(err)
                    return
            limit = settings.max_request_bytes
            declared = headers.get(b"content-length", b"")
            if limit and declared.isdigit() and int(declared) > limit:
                await answer(body_too_large(int(declared), limit))
                return
            bounded = _BoundedReceive(receive, limit, settings.body_timeout_s)
            call = self.app(scope, bounded, tracked_send)
            if settings.request_timeout_s:
                try:
                    await asyncio.wait_for(call, settings.request_timeout_s)
                except asyncio.TimeoutError:
                    if started:
                        raise
                    await answer(
                        APIError(
                            504,
                            f"The request took over {settings.request_timeout_s:g}s "
                            f"(serve.request_timeout_s); retry, or send fewer texts.",
                            code="timeout",
                        )
                    )
            else:
                await call
        finally:
            if settings.on_response is not None:
                try:
                    settings.on_response(route, status, time.perf_counter() - started_at)
                except Exception:  # metrics never fail a request
                    log.exception("Recording the response metrics failed")


class _BoundedReceive:
    """``receive`` that refuses a body over ``limit`` bytes (413) or sent slower than
    ``timeout_s`` in all (408)."""

    def __init__(self, receive: Receive, limit: int, timeout_s: float) -> None:
        self.receive = receive
        self.limit = limit
        self.deadline = time.monotonic() + timeout_s if timeout_s else None
        self.timeout_s = timeout_s
        self.size = 0
        self.done = False

    async def __call__(self) -> Message:
        if self.done or self.deadline is None:
            message = await self.receive()
        else:
            try:
                message = await asyncio.wait_for(
                    self.receive(), max(0.0, self.deadline - time.monotonic())
                )
            except asyncio.TimeoutError:
                raise APIError(
                    408,
                    f"The request body did not arrive within {self.timeout_s:g}s "
                    f"(serve.body_timeout_s): {self.size} bytes came. Send the whole body "
                    f"promptly, with a correct Content-Length.",
                    code="request_timeout",
                ) from None
        if message["type"] == "http.request":
            self.size += len(message.get("body", b""))
            if self.limit and self.size > self.limit:
                raise body_too_large(self.size, self.limit)
            if not message.get("more_body", False):
                self.done = True
        return message
