"""The Serve app over real HTTP on the local Ray: values, formats, OpenAI client, errors, health.

One app (the tiny sentence-transformers teacher) is deployed for the whole module and Serve is
shut down at the end, so later Train tests get both CPUs back.
"""

from __future__ import annotations

import json
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest

from l2vg_ray.serve.protocol import decode_base64
from l2vg_ray.testing import SERVE_MAX_BYTES as MAX_BYTES
from l2vg_ray.testing import SERVE_MAX_ITEMS as MAX_ITEMS
from l2vg_ray.testing import SERVE_MAX_TOKENS as MAX_TOKENS
from l2vg_ray.testing import SERVED_NAME as MODEL_NAME
from l2vg_ray.testing import serve_test_config as serve_config

TEXTS = [
    "What is the capital of France?",
    "How do I bake bread at home?",
    "Why is the sky blue?",
    "Who wrote Hamlet?",
    "Name a fruit that is yellow.",
]


@pytest.fixture(scope="module")
def served(ray_session, tiny_teacher_dir, tmp_path_factory):
    from ray import serve

    from l2vg_ray.serve.app import run_serve

    # The registered `teacher` baseline (load_encoder) on the tiny sentence-transformers model.
    cfg = serve_config(
        tmp_path_factory.mktemp("serve"), "teacher", "encoder", f"model.teacher={tiny_teacher_dir}"
    )
    try:
        info = run_serve(cfg, blocking=False)
        yield info
    finally:
        serve.shutdown()


@pytest.fixture(scope="module")
def reference(tiny_teacher_dir):
    from l2vg_ray.text_encoders import SentenceTransformerEncoder

    return SentenceTransformerEncoder(str(tiny_teacher_dir), device="cpu")


def _post(url: str, path: str, body, *, raw: bool = False) -> httpx.Response:
    content = body if raw else json.dumps(body).encode()
    return httpx.post(
        f"{url}{path}", content=content, timeout=60.0, headers={"content-type": "application/json"}
    )


def _embeddings(resp: httpx.Response) -> np.ndarray:
    assert resp.status_code == 200, resp.text
    data = resp.json()["data"]
    assert [d["index"] for d in data] == list(range(len(data)))
    return np.array([d["embedding"] for d in data], dtype=np.float32)


def test_health_and_models(served, reference):
    r = httpx.get(f"{served['url']}/healthz", timeout=30)
    assert r.status_code == 200
    body = r.json()
    assert (body["status"], body["model"], body["dim"]) == ("ok", MODEL_NAME, reference.dim)
    assert set(body) == {"status", "model", "dim"}  # counters live in the metrics
    models = httpx.get(f"{served['url']}/v1/models", timeout=30).json()
    assert models["object"] == "list"
    assert [m["id"] for m in models["data"]] == [MODEL_NAME]
    assert models["data"][0]["dim"] == reference.dim and models["data"][0]["decode"] is False


def test_embeddings_match_encode(served, reference):
    assert max(reference.count_tokens(TEXTS)) <= MAX_TOKENS  # no truncation in this test
    r = _post(served["url"], "/v1/embeddings", {"input": TEXTS, "model": MODEL_NAME})
    got = _embeddings(r)
    body = r.json()
    assert body["object"] == "list" and body["model"] == MODEL_NAME
    assert all(d["object"] == "embedding" for d in body["data"])
    assert got.shape == (len(TEXTS), reference.dim)
    np.testing.assert_allclose(got, reference.encode(TEXTS), atol=1e-5)
    n_tokens = sum(reference.count_tokens(TEXTS))
    assert body["usage"] == {"prompt_tokens": n_tokens, "total_tokens": n_tokens}

    single = _embeddings(_post(served["url"], "/v1/embeddings", {"input": TEXTS[2]}))
    np.testing.assert_allclose(single, reference.encode(TEXTS[2:3]), atol=1e-5)


def test_base64_decodes_to_the_same_floats(served):
    floats = _embeddings(_post(served["url"], "/v1/embeddings", {"input": TEXTS}))
    r = _post(served["url"], "/v1/embeddings", {"input": TEXTS, "encoding_format": "base64"})
    assert r.status_code == 200, r.text
    decoded = np.stack([decode_base64(d["embedding"]) for d in r.json()["data"]])
    np.testing.assert_array_equal(decoded, floats)


def test_instruction_and_dimensions(served, reference):
    instruction = "Find the answer:"
    r = _post(
        served["url"],
        "/v1/embeddings",
        {"input": TEXTS[:2], "instruction": instruction, "dimensions": reference.dim},
    )
    np.testing.assert_allclose(
        _embeddings(r), reference.encode(TEXTS[:2], instruction=instruction), atol=1e-5
    )
    # the instruction's tokens count toward usage (and toward the per-text budget)
    counts = reference.count_tokens(TEXTS[:2], instruction=instruction)
    assert max(counts) <= MAX_TOKENS and r.json()["usage"]["prompt_tokens"] == sum(counts)
    assert sum(counts) > sum(reference.count_tokens(TEXTS[:2]))


def test_openai_client(served, reference):
    from openai import OpenAI

    client = OpenAI(base_url=f"{served['url']}/v1", api_key="not-needed", max_retries=0)
    for fmt in ("float", "base64"):  # the client asks for base64 by default and decodes it
        kwargs = {"encoding_format": fmt} if fmt == "float" else {}
        out = client.embeddings.create(model=MODEL_NAME, input=TEXTS[:3], **kwargs)
        got = np.array([d.embedding for d in out.data], dtype=np.float32)
        np.testing.assert_allclose(got, reference.encode(TEXTS[:3]), atol=1e-5)
        assert out.usage.prompt_tokens == sum(reference.count_tokens(TEXTS[:3]))
    assert [m.id for m in client.models.list().data] == [MODEL_NAME]


def test_concurrent_requests_and_large_lists(served, reference):
    texts = [f"{t} {i}" for i, t in enumerate(TEXTS * 3)]
    assert max(reference.count_tokens(texts)) <= MAX_TOKENS  # no truncation in this test
    expected = reference.encode(texts)

    def one(i: int) -> np.ndarray:
        return _embeddings(_post(served["url"], "/v1/embeddings", {"input": [texts[i]]}))[0]

    with ThreadPoolExecutor(8) as pool:  # concurrent requests share model batches
        got = np.stack(list(pool.map(one, range(len(texts)))))
    np.testing.assert_allclose(got, expected, atol=1e-5)
    # 8 texts with max_batch_size=4: one request split over two model batches
    big = _embeddings(_post(served["url"], "/v1/embeddings", {"input": texts[:MAX_ITEMS]}))
    np.testing.assert_allclose(big, expected[:MAX_ITEMS], atol=1e-5)


def test_metrics_count_requests_batches_and_tokens(
    served, reference, tiny_teacher_dir, tmp_path
):
    """Its own app, so that its metrics (tagged by application) start from zero."""
    from ray import serve

    from l2vg_ray.serve.app import run_serve
    from l2vg_ray.serve.metrics import metrics_url, read_metric

    app = "metered"
    cfg = serve_config(
        tmp_path,
        "teacher",
        "encoder",
        f"model.teacher={tiny_teacher_dir}",
        f"serve.app_name={app}",
        f"serve.route_prefix=/{app}",
    )

    def scrape() -> dict:
        text = httpx.get(metrics_url(), timeout=30).text
        embeddings = {"application": app, "route": "/v1/embeddings"}
        return {
            "ok": read_metric(text, "l2vg_requests", status="200", **embeddings),
            "bad": read_metric(text, "l2vg_requests", status="400", **embeddings),
            "latency": read_metric(text, "l2vg_request_seconds_count", **embeddings),
            "calls": read_metric(text, "l2vg_model_calls", application=app),
            "texts": read_metric(text, "l2vg_model_texts", application=app),
            "histogram": read_metric(text, "l2vg_batch_texts_count", application=app),
            "tokens": read_metric(text, "l2vg_tokens_embedded", application=app),
        }

    try:
        url = run_serve(cfg, blocking=False)["url"]
        texts = TEXTS[:3]
        for _ in range(3):
            _embeddings(_post(url, "/v1/embeddings", {"input": texts}))
        assert _post(url, "/v1/embeddings", {"input": []}).status_code == 400
        deadline = time.monotonic() + 60  # replicas push metrics to the node every few seconds
        while True:
            got = scrape()
            if (got["ok"], got["bad"], got["texts"]) == (3, 1, 9) or time.monotonic() > deadline:
                break
            time.sleep(1)
        assert (got["ok"], got["bad"], got["latency"], got["texts"]) == (3, 1, 4, 9), got
        assert 1 <= got["calls"] <= 9 and got["histogram"] == got["calls"]
        assert got["tokens"] == 3 * sum(reference.count_tokens(texts))
    finally:
        serve.delete(app)


def test_long_text_is_truncated(served, reference):
    long_text = " ".join(["bread and water and salt"] * 30)
    assert reference.count_tokens([long_text])[0] > MAX_TOKENS
    r = _post(served["url"], "/v1/embeddings", {"input": [TEXTS[0], long_text]})
    # cut once at a token boundary: MAX_TOKENS tokens with the 2 special ones
    offsets = reference.tokenizer(long_text, add_special_tokens=False, return_offsets_mapping=True)[
        "offset_mapping"
    ]
    kept = long_text[: offsets[MAX_TOKENS - 3][1]]
    assert reference.count_tokens([kept]) == [MAX_TOKENS]
    np.testing.assert_allclose(_embeddings(r), reference.encode([TEXTS[0], kept]), atol=1e-5)
    usage = r.json()["usage"]
    assert usage["prompt_tokens"] == reference.count_tokens([TEXTS[0]])[0] + MAX_TOKENS
    assert usage["truncated_inputs"] == [1]


BAD_REQUESTS = [
    # (name, path, body (bytes = raw), status, code, param)
    ("invalid json", "/v1/embeddings", b'{"input": ["a",', 400, "invalid_json", None),
    ("not an object", "/v1/embeddings", b'["a", "b"]', 400, "invalid_json", None),
    ("empty body", "/v1/embeddings", b"", 400, "invalid_json", None),
    ("not utf-8", "/v1/embeddings", b'{"input": "\xff\xfe"}', 400, "invalid_json", None),
    (
        "missing input",
        "/v1/embeddings",
        {"model": MODEL_NAME},
        400,
        "missing_required_parameter",
        "input",
    ),
    ("input wrong type", "/v1/embeddings", {"input": {"text": "a"}}, 400, "invalid_type", "input"),
    ("empty list", "/v1/embeddings", {"input": []}, 400, "empty_input", "input"),
    ("empty string", "/v1/embeddings", {"input": ""}, 400, "empty_input", "input[0]"),
    ("blank item", "/v1/embeddings", {"input": ["a", "  "]}, 400, "empty_input", "input[1]"),
    ("non-string item", "/v1/embeddings", {"input": ["a", 3]}, 400, "invalid_type", "input[1]"),
    ("null item", "/v1/embeddings", {"input": ["a", None]}, 400, "invalid_type", "input[1]"),
    ("token ids", "/v1/embeddings", {"input": [[1, 2, 3]]}, 400, "invalid_type", "input[0]"),
    (
        "too many items",
        "/v1/embeddings",
        {"input": ["a"] * (MAX_ITEMS + 1)},
        400,
        "too_many_items",
        "input",
    ),
    (
        "body too large",
        "/v1/embeddings",
        {"input": ["x" * (MAX_BYTES + 10)]},
        413,
        "request_too_large",
        None,
    ),
    (
        "unknown model",
        "/v1/embeddings",
        {"input": "a", "model": "gpt-4"},
        404,
        "model_not_found",
        "model",
    ),
    (
        "model wrong type",
        "/v1/embeddings",
        {"input": "a", "model": 7},
        400,
        "invalid_type",
        "model",
    ),
    (
        "bad encoding_format",
        "/v1/embeddings",
        {"input": "a", "encoding_format": "int8"},
        400,
        "invalid_value",
        "encoding_format",
    ),
    (
        "dimensions mismatch",
        "/v1/embeddings",
        {"input": "a", "dimensions": 8},
        400,
        "invalid_value",
        "dimensions",
    ),
    (
        "dimensions wrong type",
        "/v1/embeddings",
        {"input": "a", "dimensions": "32"},
        400,
        "invalid_type",
        "dimensions",
    ),
    (
        "instruction wrong type",
        "/v1/embeddings",
        {"input": "a", "instruction": ["x"]},
        400,
        "invalid_type",
        "instruction",
    ),
    ("decode unsupported", "/v1/decode", {"input": "a"}, 400, "decode_not_supported", None),
    ("decode empty list", "/v1/decode", {"input": []}, 400, "empty_input", "input"),
]


@pytest.mark.parametrize(
    "name,path,body,status,code,param", BAD_REQUESTS, ids=[b[0] for b in BAD_REQUESTS]
)
def test_bad_requests_get_4xx_with_error_body(served, name, path, body, status, code, param):
    r = _post(served["url"], path, body, raw=isinstance(body, bytes))
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert err["type"] == "invalid_request_error"
    assert err["code"] == code and err["param"] == param
    assert err["message"] and "Traceback" not in err["message"]


def test_unknown_route_and_method(served):
    r = httpx.get(f"{served['url']}/v1/nothing", timeout=30)
    assert r.status_code == 404 and r.json()["error"]["type"] == "invalid_request_error"
    r = httpx.get(f"{served['url']}/v1/embeddings", timeout=30)
    assert r.status_code == 405 and "not allowed" in r.json()["error"]["message"]


def test_model_that_fails_to_load_is_reported_and_leaves_others_serving(
    served, tmp_path
):
    from ray import serve

    from l2vg_ray.serve.app import run_serve

    cfg = serve_config(
        tmp_path,
        tmp_path / "no-such-model",
        "sentence-transformers",
        "serve.app_name=broken",
        "serve.route_prefix=/broken",
        "serve.load_retries=0",
    )
    try:
        with pytest.raises(RuntimeError, match="failed to load") as info:
            run_serve(cfg, blocking=False)
        assert "no-such-model" in str(info.value)
        r = httpx.get(f"{served['url']}/healthz", timeout=30)
        assert r.status_code == 200  # the healthy app is untouched
    finally:
        serve.delete("broken")


@pytest.fixture(scope="module")
def served_l2vg(served, tiny_llm_dir, tiny_teacher_dir, tmp_path_factory):
    """An untrained-but-valid trained-encoder folder on the tiny LLM, served with truncate=false."""
    from ray import serve

    from l2vg_ray.method import L2VGEncoder
    from l2vg_ray.serve.app import run_serve

    tmp = tmp_path_factory.mktemp("serve-l2vg")
    cfg = serve_config(
        tmp,
        tmp / "encoder",
        "encoder",  # load_encoder: a trained-encoder folder
        f"model.llm={tiny_llm_dir}",
        f"model.teacher={tiny_teacher_dir}",
        "model.n_thought=2",
        "model.n_compression=2",
        "model.max_length=64",
        "serve.model_name=tiny-l2vg",
        "serve.app_name=l2vg-tiny",
        "serve.route_prefix=/tiny",
        "serve.truncate=false",
        "serve.max_new_tokens=8",
    )
    encoder = L2VGEncoder.from_config(cfg.model, teacher_dim=32, device="cpu")
    encoder.save(tmp / "encoder")
    try:
        info = run_serve(cfg, blocking=False)
        yield info, L2VGEncoder.load(tmp / "encoder", device="cpu")
    finally:
        serve.delete("l2vg-tiny")


def test_trained_encoder_embeddings_and_decode(served_l2vg):
    info, encoder = served_l2vg
    assert info["url"].endswith("/tiny") and info["dim"] == encoder.dim
    r = _post(info["url"], "/v1/embeddings", {"input": TEXTS[:3], "model": "tiny-l2vg"})
    np.testing.assert_allclose(_embeddings(r), encoder.encode(TEXTS[:3]), atol=1e-5)
    assert r.json()["usage"]["prompt_tokens"] == sum(encoder.count_tokens(TEXTS[:3]))

    r = _post(info["url"], "/v1/decode", {"input": TEXTS[:2], "max_new_tokens": 6})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["model"] == "tiny-l2vg"
    assert [d["index"] for d in body["data"]] == [0, 1]
    assert [d["text"] for d in body["data"]] == encoder.decode(TEXTS[:2], max_new_tokens=6)
    models = httpx.get(f"{info['url']}/v1/models", timeout=30).json()["data"][0]
    assert models["decode"] is True


@pytest.mark.parametrize(
    "path,body,status,code,param",
    [
        ("/v1/embeddings", {"input": ["bread " * 80]}, 413, "context_length_exceeded", "input[0]"),
        ("/v1/decode", {"input": "a", "max_new_tokens": 9}, 400, "invalid_value", "max_new_tokens"),
        (
            "/v1/decode",
            {"input": "a", "max_new_tokens": "4"},
            400,
            "invalid_type",
            "max_new_tokens",
        ),
        ("/v1/decode", {"input": "a", "model": "l2vg"}, 404, "model_not_found", "model"),
    ],
)
def test_trained_encoder_bad_requests(served_l2vg, path, body, status, code, param):
    r = _post(served_l2vg[0]["url"], path, body)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert (err["code"], err["param"], err["type"]) == (code, param, "invalid_request_error")
