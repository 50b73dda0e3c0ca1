"""What a security review sends, replayed over real HTTP against a real Serve app (tiny model).

One row per finding of the serving review (issue "Serving you can put in production"), then a
bounded soak. The app runs with an API key, a 3 s body timeout and the model's own 128-token
limit under a 512-token serving limit. Timeouts here are generous bounds on a hang, never
performance assertions.
"""

from __future__ import annotations

import json
import random
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from urllib.parse import urlparse

import httpx
import numpy as np
import pytest

from l2vg_ray.testing import serve_test_config

KEY = "test-key-123"
AUTH = {"authorization": f"Bearer {KEY}", "content-type": "application/json"}
BODY_TIMEOUT_S = 3
POOL = [f"Question {i}: how does {w} work in practice?" for i, w in enumerate(
    "bread rain wind sand glass steel paper music light sleep salt ice fire clay rope wax".split()
)]


@pytest.fixture(scope="module")
def app(ray_session, tiny_teacher_dir, tmp_path_factory):
    from ray import serve

    from l2vg_ray.serve.app import run_serve

    cfg = serve_test_config(
        tmp_path_factory.mktemp("serve-abuse"),
        "teacher",
        "encoder",
        f"model.teacher={tiny_teacher_dir}",
        "serve.app_name=hardened",
        "serve.route_prefix=/hardened",
        f"serve.api_key={KEY}",
        "serve.max_tokens_per_text=512",  # above the tiny teacher's own 128
        "serve.max_items_per_request=256",
        "serve.max_request_bytes=2000000",
        f"serve.body_timeout_s={BODY_TIMEOUT_S}",
        "serve.max_batch_size=16",
        "serve.access_log=false",
    )
    try:
        yield run_serve(cfg, blocking=False)["url"]
    finally:
        serve.shutdown()


@pytest.fixture(scope="module")
def reference(tiny_teacher_dir):
    from l2vg_ray.text_encoders import SentenceTransformerEncoder

    return SentenceTransformerEncoder(str(tiny_teacher_dir), device="cpu")


def _post(url: str, body, *, path: str = "/v1/embeddings", headers=AUTH, timeout=60.0):
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    return httpx.post(f"{url}{path}", content=content, headers=headers, timeout=timeout)


def _error(r: httpx.Response, status: int) -> dict:
    assert r.status_code == status, r.text[:500]
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    return err


def _vectors(r: httpx.Response) -> np.ndarray:
    assert r.status_code == 200, r.text[:500]
    return np.array([d["embedding"] for d in r.json()["data"]], dtype=np.float32)


def test_api_key_on_every_route_but_health_and_docs(app):
    for path, method in (("/v1/embeddings", "post"), ("/v1/models", "get"), ("/v1/decode", "post")):
        r = httpx.request(method, f"{app}{path}", json={"input": "a"}, timeout=30)
        assert _error(r, 401)["code"] == "invalid_api_key"
        assert r.headers["www-authenticate"] == "Bearer"
    wrong = {**AUTH, "authorization": "Bearer not-the-key"}
    assert _error(_post(app, {"input": "a"}, headers=wrong), 401)["code"] == "invalid_api_key"
    assert httpx.get(f"{app}/healthz", timeout=30).status_code == 200
    schema = httpx.get(f"{app}/openapi.json", timeout=30).json()
    body = schema["paths"]["/v1/embeddings"]["post"]["requestBody"]["content"]
    assert "instruction" in body["application/json"]["schema"]["properties"]
    assert _vectors(_post(app, {"input": "a"})).shape[0] == 1


def test_a_lone_surrogate_fails_its_own_request_only(app, reference):
    """15 valid requests and 1 with "\\ud800" (in input, then in instruction), sent together."""
    expected = reference.encode(POOL)
    bad_bodies = [rb'{"input": ["ok", "\ud800"]}', rb'{"input": "ok", "instruction": "\ud800"}']
    for trial in range(4):
        bad = bad_bodies[trial % 2]
        jobs = [("bad", bad)] + [("ok", i) for i in range(15)]
        random.Random(trial).shuffle(jobs)

        def send(job):
            kind, x = job
            if kind == "bad":
                return kind, x, _post(app, x)
            return kind, x, _post(app, {"input": [POOL[x], POOL[x + 1]]})

        with ThreadPoolExecutor(16) as pool:
            for kind, x, r in pool.map(send, jobs):
                if kind == "bad":
                    assert _error(r, 400)["code"] == "invalid_json"
                else:
                    np.testing.assert_allclose(_vectors(r), expected[x : x + 2], atol=1e-5)


@pytest.mark.parametrize(
    "name,body",
    [
        ("nested 1500 levels", b'{"input": "a", "x": ' + b"[" * 1500 + b"]" * 1500 + b"}"),
        ("5001-digit integer", b'{"input": "a", "dimensions": ' + b"9" * 5001 + b"}"),
        ("nested input", b'{"input": ' + b"[" * 1500 + b"]" * 1500 + b"}"),
        ("not UTF-8", b'{"input": "\xc3\x28"}'),
    ],
)
def test_parser_bombs_are_400(app, name, body):
    assert _error(_post(app, body), 400)["code"] == "invalid_json"


def _slow_body_socket(url: str, declared: int = 5000) -> socket.socket:
    """A client that declares ``declared`` bytes and sends a few."""
    u = urlparse(url)
    sock = socket.create_connection((u.hostname, u.port), timeout=30)
    head = (
        f"POST {u.path}/v1/embeddings HTTP/1.1\r\nHost: {u.hostname}\r\n"
        f"Authorization: Bearer {KEY}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {declared}\r\n\r\n"
    )
    sock.sendall(head.encode() + b'{"input": ["slow')
    return sock


def _reply(sock: socket.socket) -> str:
    """One whole HTTP reply (headers and a Content-Length body) from ``sock``."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            break
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    length = next(
        (int(line.split(b":")[1]) for line in head.split(b"\r\n")
         if line.lower().startswith(b"content-length:")),
        0,
    )
    while len(body) < length:
        chunk = sock.recv(65536)
        if not chunk:
            break
        body += chunk
    return (head + b"\r\n\r\n" + body).decode("latin-1")


def test_slow_body_clients_are_timed_out_and_block_no_one(app):
    socks = [_slow_body_socket(app) for _ in range(16)]
    try:
        # Everyone else is answered while the 16 hold their connections open.
        assert httpx.get(f"{app}/healthz", timeout=10).status_code == 200
        assert httpx.get(f"{app}/v1/models", headers=AUTH, timeout=10).status_code == 200
        assert _vectors(_post(app, {"input": "hello"}, timeout=10)).shape[0] == 1
        # ... and each slow client is answered 408 once its body time is up.
        for sock in socks:
            reply = _reply(sock)
            assert reply.startswith("HTTP/1.1 408"), reply[:200]
            assert '"code":"request_timeout"' in reply
    finally:
        for sock in socks:
            sock.close()


def test_a_huge_request_is_cut_to_the_models_limit_and_stalls_no_one(app, reference):
    """256 texts x 3.8 KB: usage counts the model's 128 tokens per text; health and a one-text
    request are answered while it runs."""
    big = [(f"text {i} " + "bread and water " * 240)[:3800] for i in range(256)]
    done: dict[str, float] = {}

    def timed(name, fn):
        out = fn()
        done[name] = time.monotonic()
        return out

    with ThreadPoolExecutor(3) as pool:
        f_big = pool.submit(timed, "big", lambda: _post(app, {"input": big}, timeout=300))
        time.sleep(0.3)
        f_health = pool.submit(timed, "health", lambda: httpx.get(f"{app}/healthz", timeout=60))
        f_small = pool.submit(timed, "small", lambda: _post(app, {"input": POOL[0]}))
        r_big, r_health, r_small = f_big.result(), f_health.result(), f_small.result()
    assert r_health.status_code == 200
    np.testing.assert_allclose(_vectors(r_small), reference.encode(POOL[:1]), atol=1e-5)
    assert _vectors(r_big).shape == (256, reference.dim)
    usage = r_big.json()["usage"]
    limit = reference.max_input_tokens
    assert limit == 128 and usage["prompt_tokens"] == 256 * limit
    assert usage["truncated_inputs"] == list(range(256))
    assert done["small"] < done["big"] and done["health"] < done["big"]


def test_an_instruction_counts_toward_the_budget(app, reference):
    huge = "Represent this text for retrieval, carefully and precisely. " * 64  # ~3.8 KB
    err = _error(_post(app, {"input": ["a cat", "a dog"], "instruction": huge}), 400)
    assert (err["param"], err["code"]) == ("instruction", "instruction_too_long")
    # A long-but-fitting instruction still leaves the texts their say.
    instruction = "Represent this text for retrieval:"
    r = _post(app, {"input": ["a cat", "a dog"], "instruction": instruction})
    got = _vectors(r)
    assert not np.allclose(got[0], got[1])
    counts = reference.count_tokens(["a cat", "a dog"], instruction=instruction)
    assert r.json()["usage"]["prompt_tokens"] == sum(counts)


def test_a_killed_model_replica_is_retried_or_answered_503(app, reference):
    """SIGKILL the model replica with 3 requests in flight: each is answered by a new replica
    (the ingress retries once) or with an OpenAI-shaped 503, never a plain-text 500."""
    import os
    import signal

    from ray import serve

    model = serve.get_deployment_handle("EmbeddingModel", app_name="hardened")
    pid = model.info.remote().result()["pid"]
    texts = [(f"text {i} " + "salt and water " * 240)[:3800] for i in range(256)]
    with ThreadPoolExecutor(3) as pool:
        inflight = [pool.submit(_post, app, {"input": texts}, timeout=300) for _ in range(3)]
        time.sleep(0.5)
        os.kill(pid, signal.SIGKILL)
        answers = [f.result() for f in inflight]
    for r in answers:
        assert r.headers["content-type"].startswith("application/json"), r.text[:200]
        if r.status_code == 200:
            assert len(r.json()["data"]) == 256
        else:
            assert _error(r, 503)["code"] == "model_unavailable"
    deadline = time.monotonic() + 180
    while True:  # recovered: a new replica answers
        r = _post(app, {"input": POOL[0]}, timeout=60)
        if r.status_code == 200 or time.monotonic() > deadline:
            break
        time.sleep(1)
    np.testing.assert_allclose(_vectors(r), reference.encode(POOL[:1]), atol=1e-5)
    assert model.info.remote().result()["pid"] != pid


def test_bounded_soak(app, reference):
    """32 clients x 15 s, 10% malformed bodies, 2 slow-body clients: every valid request is
    answered correctly, no 5xx, /healthz answers throughout."""
    expected = reference.encode(POOL)
    stop = time.monotonic() + 15
    malformed = [b'{"input": ', b'{"input": "\\ud800"}', b"[1]", b'{"input": []}', b"\xff"]
    failures: list[str] = []
    counts = {"ok": 0, "rejected": 0, "health": 0}
    lock = threading.Lock()

    def client(seed: int) -> None:
        rng = random.Random(seed)
        with httpx.Client(headers=AUTH, timeout=60) as http:
            while time.monotonic() < stop:
                if rng.random() < 0.1:
                    r = http.post(f"{app}/v1/embeddings", content=rng.choice(malformed))
                    if r.status_code != 400 or "error" not in r.json():
                        failures.append(f"malformed -> {r.status_code} {r.text[:200]}")
                    with lock:
                        counts["rejected"] += 1
                    continue
                idx = rng.sample(range(len(POOL)), rng.randint(1, 6))
                r = http.post(f"{app}/v1/embeddings", json={"input": [POOL[i] for i in idx]})
                if r.status_code != 200:
                    failures.append(f"valid -> {r.status_code} {r.text[:200]}")
                    continue
                got = np.array([d["embedding"] for d in r.json()["data"]], dtype=np.float32)
                if got.shape != (len(idx), reference.dim) or not np.allclose(
                    got, expected[idx], atol=1e-5
                ):
                    failures.append(f"wrong vectors for {idx}")
                with lock:
                    counts["ok"] += 1

    def slow_client() -> None:
        while time.monotonic() < stop:
            sock = _slow_body_socket(app)
            try:
                reply = _reply(sock)
                if not reply.startswith("HTTP/1.1 408"):
                    failures.append(f"slow body -> {reply[:100]}")
            finally:
                sock.close()

    def health() -> None:
        while time.monotonic() < stop:
            r = httpx.get(f"{app}/healthz", timeout=10)
            if r.status_code != 200:
                failures.append(f"healthz -> {r.status_code}")
            with lock:
                counts["health"] += 1
            time.sleep(0.5)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(32)]
    threads += [threading.Thread(target=slow_client) for _ in range(2)]
    threads.append(threading.Thread(target=health))
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=180)
    assert not any(t.is_alive() for t in threads), "a client hung"
    assert not failures, failures[:10]
    assert counts["ok"] > 32 and counts["rejected"] > 0 and counts["health"] >= 10, counts
