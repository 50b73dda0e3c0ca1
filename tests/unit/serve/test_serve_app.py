"""Error plumbing and the request guard on a plain FastAPI app, the ingress's app factory,
deployment options and the app builder (no Ray cluster)."""

from __future__ import annotations

import asyncio
import json
import time
from types import SimpleNamespace

import pytest
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from fastapi.testclient import TestClient
from pydantic import BaseModel

from l2vg_ray.config import ConfigError, load_config
from l2vg_ray.serve.http import INTERNAL_ERROR, GuardSettings, install_error_handlers
from l2vg_ray.serve.protocol import APIError


class Item(BaseModel):
    n: int


def _client(guard: GuardSettings | None = None) -> TestClient:
    app = FastAPI()
    install_error_handlers(app)
    if guard is not None:
        app.state.guard = guard

    @app.post("/api-error")
    async def api_error():
        raise APIError(418, "short and stout", param="pot", code="teapot")

    @app.post("/boom")
    async def boom():
        raise RuntimeError("secret internal detail")

    @app.post("/typed")
    async def typed(item: Item):
        return {"n": item.n}

    @app.post("/body")
    async def body(request: Request):
        return {"size": len(await request.body())}

    @app.get("/slow")
    async def slow():
        await asyncio.sleep(5)
        return {}

    @app.get("/healthz")
    async def healthz():
        return {"status": "ok"}

    @app.get("/loading")
    async def loading():
        raise APIError(503, "loading", code="model_loading")

    return TestClient(app, raise_server_exceptions=False)


def _error(r, status):
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    return err


def test_api_error_body():
    err = _error(_client().post("/api-error"), 418)
    assert err == {
        "message": "short and stout",
        "type": "invalid_request_error",
        "param": "pot",
        "code": "teapot",
    }


def test_unexpected_exception_is_a_500_without_details():
    r = _client().post("/boom")
    err = _error(r, 500)
    assert err["message"] == INTERNAL_ERROR and err["type"] == "server_error"
    assert "secret" not in r.text and "Traceback" not in r.text


def test_fastapi_validation_errors_are_400():
    c = _client()
    err = _error(c.post("/typed", json={"n": "not a number"}), 400)
    assert err["param"] == "n" and err["code"] == "invalid_request"
    err = _error(
        c.post("/typed", content=b"{oops", headers={"content-type": "application/json"}), 400
    )
    assert err["type"] == "invalid_request_error"


def test_unknown_route_method_and_503():
    c = _client()
    assert "No route" in _error(c.get("/nowhere"), 404)["message"]
    assert "not allowed" in _error(c.get("/boom"), 405)["message"]
    r = c.get("/loading")
    assert _error(r, 503)["type"] == "server_error" and r.headers["retry-after"] == "1"


def test_guard_body_limit():
    c = _client(GuardSettings(max_request_bytes=10))
    assert c.post("/body", content=b"0123456789").json() == {"size": 10}
    err = _error(c.post("/body", content=b"0123456789x"), 413)  # refused by Content-Length
    assert err["code"] == "request_too_large"

    def chunks():  # no content-length: counted while streaming
        yield b"01234"
        yield b"567890"

    assert _error(c.post("/body", content=chunks()), 413)["code"] == "request_too_large"


def test_guard_body_and_request_timeouts():
    guard = GuardSettings(body_timeout_s=0.3, request_timeout_s=0.5)
    app = _client(guard).app

    async def slow_client() -> list[dict]:  # declares 10 bytes, sends 5, then nothing
        sent = []
        chunks = [{"type": "http.request", "body": b"01234", "more_body": True}]

        async def receive():
            if chunks:
                return chunks.pop()
            await asyncio.sleep(30)

        async def send(message):
            sent.append(message)

        scope = {
            "type": "http",
            "asgi": {"version": "3.0"},
            "http_version": "1.1",
            "method": "POST",
            "scheme": "http",
            "path": "/body",
            "raw_path": b"/body",
            "root_path": "",
            "query_string": b"",
            "headers": [(b"content-length", b"10")],
            "client": ("127.0.0.1", 1),
            "server": ("127.0.0.1", 2),
        }
        await asyncio.wait_for(app(scope, receive, send), 5)
        return sent

    started = time.monotonic()
    sent = asyncio.run(slow_client())
    assert time.monotonic() - started < 4  # freed by the body timeout, not the client
    assert sent[0]["status"] == 408
    err = json.loads(b"".join(m.get("body", b"") for m in sent[1:]))["error"]
    assert err["code"] == "request_timeout" and "serve.body_timeout_s" in err["message"]
    err = _error(_client(guard).get("/slow"), 504)
    assert err["code"] == "timeout" and err["type"] == "server_error"


def test_guard_api_key_and_reports_every_answer():
    seen = []
    c = _client(GuardSettings(api_key="s3cret", on_response=lambda *a: seen.append(a)))
    r = c.post("/body", content=b"x")
    assert _error(r, 401)["code"] == "invalid_api_key" and r.headers["www-authenticate"] == "Bearer"
    wrong = {"authorization": "Bearer nope"}
    assert "not valid" in _error(c.post("/body", content=b"x", headers=wrong), 401)["message"]
    basic = {"authorization": "Basic s3cret"}
    assert _error(c.post("/body", content=b"x", headers=basic), 401)["code"] == "invalid_api_key"
    ok = {"authorization": "Bearer s3cret"}
    assert c.post("/body", content=b"xy", headers=ok).json() == {"size": 2}
    assert c.get("/healthz").status_code == 200  # health needs no key
    assert [(route, status) for route, status, _ in seen] == [
        ("/body", 401),
        ("/body", 401),
        ("/body", 401),
        ("/body", 200),
        ("/healthz", 200),
    ]
    assert all(seconds >= 0 for *_, seconds in seen)


def _stub_server(key: str) -> SimpleNamespace:
    """What ``build_api`` reads from an ingress replica: its guard and its four handlers."""

    async def embeddings(request: Request) -> JSONResponse:  # as the real ones: no validation
        return JSONResponse({"key": key, "size": len(await request.body())})

    async def decode(request: Request):
        raise APIError(400, "cannot decode", code="decode_not_supported")

    async def models() -> JSONResponse:
        return JSONResponse({"object": "list", "data": []})

    async def healthz() -> JSONResponse:
        return JSONResponse({"status": "ok"})

    return SimpleNamespace(
        guard=GuardSettings(api_key=key),
        embeddings=embeddings,
        decode=decode,
        models=models,
        healthz=healthz,
    )


def test_each_ingress_replica_builds_its_own_app():
    from l2vg_ray.serve import app as serve_app
    from l2vg_ray.serve.app import build_api

    assert not [k for k, v in vars(serve_app).items() if isinstance(v, FastAPI)]  # none shared
    a, b = build_api(_stub_server("a-key")), build_api(_stub_server("b-key"))
    assert a is not b and (a.state.guard.api_key, b.state.guard.api_key) == ("a-key", "b-key")
    c = TestClient(a, raise_server_exceptions=False)
    key_a, key_b = ({"authorization": f"Bearer {k}"} for k in ("a-key", "b-key"))
    assert _error(c.post("/v1/embeddings", content=b"x", headers=key_b), 401)
    assert c.post("/v1/embeddings", content=b"xy", headers=key_a).json() == {"key": "a-key", "size": 2}
    assert _error(c.post("/v1/decode", headers=key_a), 400)["code"] == "decode_not_supported"
    assert c.get("/v1/models", headers=key_a).json()["object"] == "list"
    assert c.get("/healthz").json() == {"status": "ok"}  # health needs no key
    assert "not allowed" in _error(c.get("/v1/embeddings", headers=key_a), 405)["message"]
    schema = c.get("/openapi.json").json()["paths"]
    assert set(schema) == {"/v1/embeddings", "/v1/decode", "/v1/models", "/healthz"}
    post = schema["/v1/embeddings"]["post"]
    assert post["requestBody"]["content"]["application/json"]["schema"]["required"] == ["input"]
    assert {"400", "401", "413", "429", "503"} <= set(post["responses"])


def test_deployment_options_from_config():
    from l2vg_ray.serve.app import deployment_options

    cfg = load_config(
        None,
        [
            "serve.min_replicas=1",
            "serve.max_replicas=4",
            "serve.target_ongoing_requests=16",
            "serve.num_cpus=2",
            "serve.num_gpus=0.5",
            "serve.max_ongoing_requests=48",
        ],
    )
    assert deployment_options(cfg.serve) == {
        "autoscaling_config": {
            "min_replicas": 1,
            "initial_replicas": 1,
            "max_replicas": 4,
            "target_ongoing_requests": 16.0,
            "upscale_delay_s": 30.0,  # Serve's defaults
            "downscale_delay_s": 600.0,
        },
        "ray_actor_options": {"num_cpus": 2.0, "num_gpus": 0.5},  # no custom resources asked
        "max_ongoing_requests": 48,
        "max_queued_requests": 256,
        "max_constructor_retry_count": 3,
        "health_check_period_s": 10.0,
        "health_check_timeout_s": 60.0,
        "logging_config": {"enable_access_log": True},
    }
    for bad in (
        ["serve.min_replicas=3", "serve.max_replicas=2"],
        ["serve.max_batch_size=0"],
        ["serve.target_ongoing_requests=100"],
        ["serve.max_batch_tokens=0"],
        ["serve.body_timeout_s=0"],
    ):
        with pytest.raises(ConfigError):
            deployment_options(load_config(None, bad).serve)


def test_deployment_options_carry_custom_resources_and_scaling_delays():
    """On an autoscaling cluster a pending replica that asks serve_slot is demand for the node
    type offering it; Serve itself accepts the options (its own validation, no Ray started)."""
    from l2vg_ray.serve.app import EmbeddingModel, deployment_options

    cfg = load_config(None, ["serve.resources.serve_slot=1", "serve.upscale_delay_s=5",
                             "serve.downscale_delay_s=60", "serve.num_gpus=1"])
    options = deployment_options(cfg.serve)
    assert options["ray_actor_options"] == {"num_cpus": 1.0, "num_gpus": 1.0,
                                            "resources": {"serve_slot": 1.0}}
    scaling = options["autoscaling_config"]
    assert (scaling["upscale_delay_s"], scaling["downscale_delay_s"]) == (5.0, 60.0)
    deployment = EmbeddingModel.options(**options)
    assert deployment._replica_config.resource_dict == {"CPU": 1.0, "GPU": 1.0, "serve_slot": 1.0}
    assert deployment._deployment_config.autoscaling_config.upscale_delay_s == 5.0
    assert deployment._deployment_config.autoscaling_config.downscale_delay_s == 60.0


def test_build_app_reads_args_and_rejects_typos(tiny_teacher_dir, tmp_path):
    from ray.serve import Application

    from l2vg_ray.serve.app import build_app

    args = {
        "model": str(tiny_teacher_dir),
        "loader": "sentence-transformers",
        "port": 0,
        "batching": False,
        "cache_dir": str(tmp_path),
        "resources": {"serve_slot": 1},  # a mapping, as a serve config file's args give it
        "downscale_delay_s": 60,
    }
    assert isinstance(build_app(args), Application)
    with pytest.raises(ConfigError, match="modle"):
        build_app({"modle": "x"})
    with pytest.raises(ValueError, match="serve.loader='st' is unknown"):
        build_app({"model": "x", "loader": "st"})


def test_serve_config_file_is_a_valid_serve_config():
    from pathlib import Path

    import yaml
    from ray.serve import Application
    from ray.serve.schema import ServeDeploySchema

    from l2vg_ray.serve.app import build_app

    repo = Path(__file__).resolve().parents[3]
    spec = ServeDeploySchema.model_validate(
        yaml.safe_load((repo / "configs/serve.yaml").read_text())
    )
    (app,) = spec.applications
    assert app.import_path == "l2vg_ray.serve.app:build_app"
    assert spec.http_options.host == "127.0.0.1"
    args = dict(app.args, config=str(repo / app.args["config"]))
    assert isinstance(build_app(args), Application)  # the model itself loads in the replicas
