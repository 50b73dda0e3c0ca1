"""Serving benchmark: the l2vg Serve app (batched, on its model thread or its event loop;
unbatched) vs a plain FastAPI peer and Infinity, on the same encoder and machine.

A bounded loopback load (127.0.0.1 only; a fixed request count AND a time limit per level, so it
always stops by itself) with 1, 8 and 32 concurrent clients (aiohttp, asyncio), one text per
request, against servers holding the same encoder (default: the all-MiniLM-L6-v2 teacher):

- ``ray-batched``:        the l2vg Serve app as configured by default: ``@serve.batch`` across
                          requests, short model calls on the event loop, long ones (at least
                          ``serve.model_thread_min_chars``) on the replica's model thread
- ``ray-batched-thread``: the same with every model call on the model thread
                          (``serve.model_thread_min_chars=0``)
- ``ray-unbatched``:    ``serve.batching=false`` (one model call per request)
- ``fastapi-peer``:     a minimal single-process FastAPI + uvicorn app, no Ray (sync endpoint,
                        one ``encode`` per request)
- ``infinity``:         Infinity (``infinity_emb v2``, torch engine, CPU) from ``.venv-infinity``
                        (``make infinity-env``), the server users deploy for this job

Every server gets the same torch thread count (``--threads``). For the Serve apps the mean texts
per model call is read from the replica's Prometheus metrics (``l2vg_model_texts`` /
``l2vg_model_calls``). The load
generator shares the machine with the servers, so absolute numbers are lower bounds; compare
the ratios.

    python bench/serve.py --quick
    python bench/serve.py --requests 600 --time-limit 60
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import socket
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import _common  # noqa: F401  (environment and sys.path)

from l2vg_ray.local_cluster import server_process

HOST = "127.0.0.1"
RESULTS = Path(__file__).resolve().parent / "results" / "serve.json"
SENTENCES = [
    "What is the capital of France?",
    "How do I bake bread at home without a mixer?",
    "Explain photosynthesis in simple terms for a child.",
    "Write a short poem about the sea at night.",
    "Why is the sky blue during the day but red at sunset?",
    "Give me three tips for better sleep.",
    "Who wrote Hamlet, and when was it first performed?",
    "How many legs does a spider have?",
]


SENTENCES_PER_TEXT = 1  # set from --sentences-per-text


def _text(i: int) -> str:
    parts = [SENTENCES[(i + k) % len(SENTENCES)] for k in range(SENTENCES_PER_TEXT)]
    return f"{' '.join(parts)} (request {i})"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


# ---------------------------------------------------------------- load generator
async def _load(
    url: str, *, concurrency: int, n_requests: int, time_limit_s: float, model: str
) -> dict:
    # aiohttp (a Ray Serve dependency) rather than httpx: the client shares the cores with the
    # servers, and aiohttp costs a fraction of httpx's CPU per request.
    import aiohttp

    latencies: list[float] = []
    errors: list[str] = []
    next_i = 0
    deadline = time.perf_counter() + time_limit_s
    connector = aiohttp.TCPConnector(limit=concurrency)
    timeout = aiohttp.ClientTimeout(total=max(30.0, time_limit_s))
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:

        async def worker() -> None:
            nonlocal next_i
            while next_i < n_requests and time.perf_counter() < deadline:
                i = next_i
                next_i += 1
                t0 = time.perf_counter()
                try:
                    async with session.post(url, json={"model": model, "input": [_text(i)]}) as r:
                        body = await r.read()
                        ok = r.status == 200 and len(json.loads(body)["data"]) == 1
                        if not ok:
                            errors.append(f"HTTP {r.status}: {body[:120]!r}")
                except Exception as e:  # counted, never fatal: the load must finish
                    errors.append(f"{type(e).__name__}: {e}"[:160])
                    ok = False
                if ok:
                    latencies.append(time.perf_counter() - t0)

        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        elapsed = time.perf_counter() - started
    lat_ms = sorted(x * 1000 for x in latencies)

    def pct(p: float) -> float | None:
        if not lat_ms:
            return None
        return round(lat_ms[min(len(lat_ms) - 1, int(p / 100 * len(lat_ms)))], 2)

    return {
        "concurrency": concurrency,
        "sent": next_i,
        "ok": len(latencies),
        "errors": len(errors),
        "first_errors": errors[:3],
        "elapsed_s": round(elapsed, 3),
        "hit_time_limit": next_i < n_requests,
        "requests_per_s": round(len(latencies) / elapsed, 2) if elapsed > 0 else 0.0,
        "p50_ms": pct(50),
        "p99_ms": pct(99),
    }


def _batch_stats(app: str | None) -> tuple[float, float] | None:
    """(model calls, texts) the Serve app ``app`` has recorded so far, once its replicas' pushes
    have settled (two equal scrapes 2 s apart); None for a server without our metrics."""
    if app is None:
        return None
    import httpx

    from l2vg_ray.serve.metrics import metrics_url, read_metric

    last = None
    for _ in range(15):
        text = httpx.get(metrics_url(), timeout=30).text
        now = (
            read_metric(text, "l2vg_model_calls", application=app),
            read_metric(text, "l2vg_model_texts", application=app),
        )
        if now == last:
            return now
        last = now
        time.sleep(2)
    return last


def measure(
    server: str, url: str, args: argparse.Namespace, model: str, app: str | None = None
) -> list[dict]:
    rows = []
    for c in args.concurrency:
        # Warm-up (not counted): connections, first-batch effects, allocator.
        asyncio.run(_load(url, concurrency=c, n_requests=c * 2, time_limit_s=30, model=model))
        before = _batch_stats(app)
        row = asyncio.run(
            _load(
                url,
                concurrency=c,
                n_requests=args.requests,
                time_limit_s=args.time_limit,
                model=model,
            )
        )
        after = _batch_stats(app)
        row["server"] = server
        if before and after and after[0] > before[0]:
            row["mean_texts_per_model_call"] = round(
                (after[1] - before[1]) / (after[0] - before[0]), 2
            )
        rows.append(row)
        print(
            f"  {server:14s} c={c:3d}  {row['requests_per_s']:8.1f} req/s  p50 {row['p50_ms']} ms  "
            f"p99 {row['p99_ms']} ms  ok {row['ok']}/{row['sent']}  errors {row['errors']}  "
            f"texts per model call {row.get('mean_texts_per_model_call', '-')}",
            flush=True,
        )
    return rows


def stall_probe(url: str, model: str) -> dict:
    """One request of 256 texts x 3.8 KB; 0.3 s later a GET /healthz and a one-text request:
    how long each waits behind the big one (the review measured 2.4 s and 19.8 s)."""
    import httpx

    big = [(f"text {i} " + "bread and water " * 240)[:3800] for i in range(256)]
    base = url.rsplit("/v1/", 1)[0]
    times: dict[str, float] = {}

    def timed(name: str, fn) -> int:
        t0 = time.perf_counter()
        status = fn().status_code
        times[name] = round(time.perf_counter() - t0, 3)
        return status

    with ThreadPoolExecutor(3) as pool:
        f_big = pool.submit(
            timed, "big_s", lambda: httpx.post(url, json={"model": model, "input": big}, timeout=600)
        )
        time.sleep(0.3)
        f_health = pool.submit(timed, "healthz_s", lambda: httpx.get(f"{base}/healthz", timeout=600))
        f_small = pool.submit(
            timed,
            "one_text_s",
            lambda: httpx.post(url, json={"model": model, "input": [_text(0)]}, timeout=600),
        )
        statuses = [f.result() for f in (f_big, f_health, f_small)]
    out = {**times, "statuses": statuses}
    print(f"  stall probe: {out}", flush=True)
    return out


# ---------------------------------------------------------------- the no-Ray peer
def peer_server(model: str, loader: str, port: int, threads: int, cache_dir: str | None) -> None:
    """A minimal single-process FastAPI app around the same encoder (runs in a subprocess)."""
    import torch
    import uvicorn
    from fastapi import FastAPI

    from l2vg_ray.config import load_config
    from l2vg_ray.serve.app import ENCODER_LOADERS

    torch.set_num_threads(threads)
    overrides = [f"serve.model={model}", f"serve.loader={loader}"]
    if cache_dir:
        overrides.append(f"cache_dir={cache_dir}")
    encoder = ENCODER_LOADERS.get(loader)(load_config(None, overrides))
    app = FastAPI()

    @app.get("/healthz")
    def healthz() -> dict:
        return {"status": "ok", "dim": encoder.dim}

    @app.post("/v1/embeddings")
    def embeddings(body: dict) -> dict:
        texts = body["input"] if isinstance(body["input"], list) else [body["input"]]
        vectors = encoder.encode(texts)
        return {
            "object": "list",
            "model": body.get("model"),
            "data": [
                {"object": "embedding", "index": i, "embedding": v.tolist()}
                for i, v in enumerate(vectors)
            ],
        }

    uvicorn.run(app, host=HOST, port=port, log_level="warning")


def run_peer(args: argparse.Namespace) -> list[dict]:

    port = _free_port()
    cmd = [
        sys.executable,
        __file__,
        "--peer-server",
        "--port",
        str(port),
        "--model",
        args.model,
        "--loader",
        args.loader,
        "--threads",
        str(args.threads),
    ]
    if args.cache_dir:
        cmd += ["--cache-dir", args.cache_dir]
    with server_process(cmd, f"http://{HOST}:{port}/healthz", name="The peer server"):
        return measure("fastapi-peer", f"http://{HOST}:{port}/v1/embeddings", args, "peer")


# ---------------------------------------------------------------- Infinity
INFINITY = Path(__file__).resolve().parents[1] / ".venv-infinity" / "bin" / "infinity_emb"


def run_infinity(args: argparse.Namespace) -> list[dict]:
    """Infinity serving the same sentence-transformers folder (torch engine, CPU)."""

    from l2vg_ray.models import resolve_model

    if not INFINITY.exists():
        raise SystemExit(f"{INFINITY} is missing: run `make infinity-env` first.")
    if args.loader != "sentence-transformers":
        raise SystemExit("Infinity serves sentence-transformers models only (--loader).")
    path = resolve_model(args.model, cache_dir=args.cache_dir)
    port = _free_port()
    cmd = [
        str(INFINITY), "v2", "--model-id", str(path), "--served-model-name", args.model,
        "--engine", "torch", "--device", "cpu", "--port", str(port), "--host", HOST,
        "--batch-size", str(args.max_batch_size), "--no-bettertransformer",
    ]  # fmt: skip
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), INFINITY_ANONYMOUS_USAGE_STATS="0",
               HF_HUB_OFFLINE="1", DO_NOT_TRACK="1")  # fmt: skip
    with server_process(cmd, f"http://{HOST}:{port}/health", name="Infinity", env=env):
        return measure("infinity", f"http://{HOST}:{port}/embeddings", args, args.model)


# ---------------------------------------------------------------- Ray Serve
def run_ray(args: argparse.Namespace, stalls: dict) -> list[dict]:
    import ray
    from ray import serve

    from l2vg_ray.config import ServeConfig, load_config
    from l2vg_ray.serve.app import run_serve

    ray.init(address="local", num_cpus=args.num_cpus, include_dashboard=False, log_to_driver=False)
    rows: list[dict] = []
    try:
        default_min_chars = ServeConfig.model_thread_min_chars
        variants = {
            "ray-batched": (True, default_min_chars),
            "ray-batched-thread": (True, 0),
            "ray-unbatched": (False, default_min_chars),
        }
        for name, (batching, min_chars) in variants.items():
            overrides = [
                f"serve.model={args.model}",
                f"serve.loader={args.loader}",
                "serve.port=0",
                f"serve.batching={str(batching).lower()}",
                f"serve.model_thread_min_chars={min_chars}",
                f"serve.app_name={name}",
                f"serve.model_name={args.model}",
                f"serve.num_cpus={args.threads}",
                f"serve.max_batch_size={args.max_batch_size}",
                f"serve.batch_wait_timeout_s={args.batch_wait_timeout_s}",
                f"serve.max_ongoing_requests={max(64, max(args.concurrency))}",
                "serve.access_log=false",  # the peer logs no requests either
            ]
            if args.cache_dir:
                overrides.append(f"cache_dir={args.cache_dir}")
            info = run_serve(load_config(None, overrides), blocking=False)
            try:
                rows += measure(name, info["embeddings_url"], args, args.model, app=name)
                if batching:
                    stalls[name] = stall_probe(info["embeddings_url"], args.model)
            finally:
                serve.delete(name)
    finally:
        serve.shutdown()
        ray.shutdown()
    return rows


def model_only(args: argparse.Namespace, n: int) -> dict:
    """The ceiling batching can reach: n texts encoded one call each vs in one call, in-process."""
    import torch

    from l2vg_ray.config import load_config
    from l2vg_ray.serve.app import ENCODER_LOADERS

    torch.set_num_threads(args.threads)
    overrides = [f"serve.model={args.model}", f"serve.loader={args.loader}"]
    if args.cache_dir:
        overrides.append(f"cache_dir={args.cache_dir}")
    encoder = ENCODER_LOADERS.get(args.loader)(load_config(None, overrides))
    texts = [_text(i) for i in range(n)]
    encoder.encode(texts[:4])  # warm-up
    t0 = time.perf_counter()
    for t in texts:
        encoder.encode([t])
    one_by_one = time.perf_counter() - t0
    t0 = time.perf_counter()
    encoder.encode(texts, batch_size=n)
    batched = time.perf_counter() - t0
    out = {
        "texts": n,
        "tokens_per_text": encoder.count_tokens(texts[:1])[0],
        "one_call_per_text_s": round(one_by_one, 3),
        "one_batch_s": round(batched, 3),
        "speedup": round(one_by_one / batched, 2),
    }
    print(
        f"  model only: {n} texts one by one {one_by_one * 1000:.0f} ms, as one batch "
        f"{batched * 1000:.0f} ms -> {out['speedup']}x",
        flush=True,
    )
    return out


def _ratio(rows: list[dict], a: str, b: str, c: int) -> float | None:
    by = {(r["server"], r["concurrency"]): r["requests_per_s"] for r in rows}
    if not by.get((b, c)) or (a, c) not in by:
        return None
    return round(by[(a, c)] / by[(b, c)], 2)


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--quick", action="store_true", help="small sizes (~4-6 min on 2 busy cores)")
    p.add_argument("--model", default="all-minilm-l6-v2")
    p.add_argument(
        "--loader",
        default="sentence-transformers",
        help="serve.loader: sentence-transformers | encoder (trained folder, baseline)",
    )
    p.add_argument("--requests", type=int, default=600, help="requests per level (upper bound)")
    p.add_argument("--time-limit", type=float, default=60.0, help="seconds per level (upper bound)")
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    p.add_argument("--threads", type=int, default=1, help="torch threads (and CPUs) per server")
    p.add_argument("--num-cpus", type=int, default=2, help="CPUs of the local Ray")
    p.add_argument("--max-batch-size", type=int, default=32)
    p.add_argument("--batch-wait-timeout-s", type=float, default=0.01)
    p.add_argument(
        "--sentences-per-text",
        type=int,
        default=1,
        help="text length: 1 = a short query (~15 tokens), 4 = ~60 tokens",
    )
    p.add_argument(
        "--servers",
        nargs="+",
        default=["peer", "ray", "infinity"],
        choices=["peer", "ray", "infinity"],
    )
    p.add_argument("--cache-dir", default=None)
    p.add_argument("--output", default=str(RESULTS), help="the JSON file to write")
    p.add_argument("--peer-server", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--port", type=int, default=0, help=argparse.SUPPRESS)
    args = p.parse_args()
    if Path(args.output).is_dir():  # fail now, not after the whole run
        p.error(f"--output {args.output!r} is a folder; give the JSON file (e.g. {RESULTS}).")
    global SENTENCES_PER_TEXT
    SENTENCES_PER_TEXT = args.sentences_per_text
    if args.peer_server:
        peer_server(args.model, args.loader, args.port, args.threads, args.cache_dir)
        return
    if args.quick:
        args.requests = min(args.requests, 150)
        args.time_limit = min(args.time_limit, 20.0)

    started = time.time()
    print(
        f"Serving benchmark: {args.model}, {args.requests} requests / {args.time_limit:.0f} s "
        f"per level, clients {args.concurrency}",
        flush=True,
    )
    ceiling = model_only(args, args.max_batch_size)
    rows = run_peer(args) if "peer" in args.servers else []
    if "infinity" in args.servers:
        rows += run_infinity(args)
    stalls: dict[str, dict] = {}
    if "ray" in args.servers:
        rows += run_ray(args, stalls)
    top = max(args.concurrency)
    ratios = {
        f"batched_vs_unbatched_rps_c{c}": _ratio(rows, "ray-batched", "ray-unbatched", c)
        for c in args.concurrency
    }
    for peer, key in (
        ("fastapi-peer", "peer"),
        ("infinity", "infinity"),
        ("ray-batched-thread", "all_on_thread"),
    ):
        ratios.update(
            {
                f"batched_vs_{key}_rps_c{c}": _ratio(rows, "ray-batched", peer, c)
                for c in args.concurrency
            }
        )
    result = {
        "benchmark": "serve",
        "model": args.model,
        "loader": args.loader,
        "example_text": _text(0),
        "settings": {
            k: getattr(args, k)
            for k in (
                "quick",
                "requests",
                "time_limit",
                "concurrency",
                "threads",
                "num_cpus",
                "max_batch_size",
                "batch_wait_timeout_s",
                "sentences_per_text",
            )
        },
        "machine": {
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "python": platform.python_version(),
            "load_avg_at_end": os.getloadavg() if hasattr(os, "getloadavg") else None,
        },
        "model_only_batching_speedup": ceiling,
        "results": rows,
        "ratios": ratios,
        "stall_probe": stalls,
        "batch_sizes": {
            r["server"] + f"_c{r['concurrency']}": r.get("mean_texts_per_model_call")
            for r in rows
            if r["server"].startswith("ray-batched")
        },
        "targets": {
            "batched_vs_unbatched_rps_at_max_clients": {
                "target": 3.0,
                "measured": ratios.get(f"batched_vs_unbatched_rps_c{top}"),
                "met": (ratios.get(f"batched_vs_unbatched_rps_c{top}") or 0) >= 3.0,
            },
            "batched_vs_infinity_rps_at_max_clients": {
                "target": 1.0,
                "measured": ratios.get(f"batched_vs_infinity_rps_c{top}"),
                "met": (ratios.get(f"batched_vs_infinity_rps_c{top}") or 0) >= 1.0,
            },
        },
        "seconds": round(time.time() - started, 1),
    }
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(json.dumps(ratios, indent=2))
    print(f"Wrote {out}")


if __name__ == "__main__":
    main()
