"""FastAPI plumbing shared by the Ray Serve app and the no-Ray peer: errors in the OpenAI shape.

``install_error_handlers(app)`` makes every failure answer ``{"error": {...}}``: our
``APIError``, FastAPI's request validation (400), unknown routes and methods (404/405), and -
through an ASGI middleware - any unexpected exception (500, message without a stack trace; the
trace goes to the server log).
"""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from l2vg_ray.serve.protocol import APIError, body_too_large, error_body

log = logging.getLogger(__name__)

INTERNAL_ERROR = "The server failed to process the request (the error is in the server log)."


def error_response(err: APIError) -> JSONResponse:
    headers = {"Retry-After": "1"} if err.status == 503 else None
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


async def read_body(request: Request, *, max_bytes: int) -> bytes:
    """The request body, refusing (413) anything over ``max_bytes`` before reading all of it."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > max_bytes:
        raise body_too_large(int(declared), max_bytes)
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > max_bytes:
            raise body_too_large(size, max_bytes)
        chunks.append(chunk)
    return b"".join(chunks)
