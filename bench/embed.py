"""Benchmark: bulk embedding with ``l2vg embed`` vs sending the same corpus through Serve.

    python bench/embed.py [--model teacher] [--texts 2000] [--clients 8] [--batch 32]

One local Ray (``--num-cpus``), one encoder (default: the all-MiniLM-L6-v2 teacher; pass
``--model l2vg-smollm2-135m-laptop`` for the packaged student), one corpus of ``--texts``
ShareGPT answer passages, measured side by side in this run:

- ``embed-job``: ``run_embed`` (Ray Data, an actor pool of ``--actors`` encoders, Parquet shards
  written exactly once), wall time from start to manifest;
- ``serve``: the l2vg Serve app with dynamic batching, ``--clients`` concurrent loopback clients
  posting ``--batch`` texts per request until the corpus is done (the loop is bounded by the
  corpus and a time limit).

Writes ``bench/results/embed.json`` with texts/s of both and their ratio. Both paths give the
same vectors (checked on a sample).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

from _common import ROOT


def corpus(n: int, cache_dir: str) -> list[str]:
    from l2vg_ray.config import load_config
    from l2vg_ray.generate.queries import load_queries

    cfg = load_config(None, [f"cache_dir={cache_dir}", "generate.queries.source=sharegpt",
                             "generate.queries.role=assistant", "generate.queries.max_words=60",
                             f"generate.queries.limit={n}"])
    texts, _ = load_queries(cfg)
    return texts


async def _post_all(url: str, texts: list[str], *, clients: int, batch: int, model: str,
                    time_limit_s: float) -> tuple[float, int, list]:
    import aiohttp

    chunks = [texts[i : i + batch] for i in range(0, len(texts), batch)]
    results: dict[int, list] = {}
    next_i = 0
    deadline = time.perf_counter() + time_limit_s
    timeout = aiohttp.ClientTimeout(total=max(60.0, time_limit_s))
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=clients),
                                     timeout=timeout) as session:
        async def worker() -> None:
            nonlocal next_i
            while next_i < len(chunks) and time.perf_counter() < deadline:
                i, next_i = next_i, next_i + 1
                async with session.post(url, json={"model": model, "input": chunks[i]}) as r:
                    body = await r.json()
                    if r.status != 200:
                        raise RuntimeError(f"POST answered {r.status}: {body}")
                    results[i] = [d["embedding"] for d in body["data"]]

        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(clients)))
        elapsed = time.perf_counter() - t0
    done = sum(len(v) for v in results.values())
    return elapsed, done, results.get(0, [])


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="teacher")
    p.add_argument("--texts", type=int, default=2000)
    p.add_argument("--actors", type=int, default=2)
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--batch", type=int, default=32, help="texts per Serve request")
    p.add_argument("--num-cpus", type=int, default=2)
    p.add_argument("--time-limit", type=float, default=900)
    p.add_argument("--out", default=str(ROOT / "bench" / "results" / "embed.json"))
    args = p.parse_args()

    import numpy as np
    import ray
    from ray import serve

    from l2vg_ray.config import load_config
    from l2vg_ray.embed import read_embeddings, run_embed
    from l2vg_ray.serve.app import run_serve

    cache_dir = os.environ.get("L2VG_CACHE", str(Path("~/.cache/l2vg_ray").expanduser()))
    texts = corpus(args.texts, cache_dir)
    work = Path(tempfile.mkdtemp(prefix="l2vg-bench-embed-"))
    path = work / "corpus.jsonl"
    path.write_text("".join(json.dumps({"id": f"t{i}", "text": t}) + "\n" for i, t in enumerate(texts)))
    ray.init(address="local", num_cpus=args.num_cpus, include_dashboard=False, log_to_driver=False)
    per_actor = args.num_cpus / args.actors
    cfg = load_config(None, [f"output_dir={work}", f"embed.input={path}", f"embed.model={args.model}",
                             f"embed.num_actors={args.actors}", f"embed.num_cpus_per_actor={per_actor}",
                             "embed.batch_size=64", "embed.rows_per_shard=1024"])
    t0 = time.perf_counter()
    manifest = run_embed(cfg)
    job_s = time.perf_counter() - t0
    job_vectors = {r["id"]: r["embedding"] for r in read_embeddings(cfg.embed.output_dir).to_pylist()}

    info = run_serve(load_config(None, [
        f"serve.model={args.model}", "serve.port=0", f"serve.num_cpus={args.num_cpus}",
        f"serve.max_items_per_request={max(args.batch, 256)}", "serve.access_log=false",
        f"serve.max_ongoing_requests={max(64, args.clients * 2)}",
    ]), blocking=False)
    try:
        serve_s, served, first = asyncio.run(_post_all(
            info["embeddings_url"], texts, clients=args.clients, batch=args.batch,
            model="l2vg", time_limit_s=args.time_limit))
    finally:
        serve.shutdown()
        ray.shutdown()
    same = bool(first) and np.allclose(np.array(first), np.array([job_vectors[f"t{i}"] for i in range(len(first))]), atol=1e-4)
    result = {
        "benchmark": "bulk embedding: l2vg embed (Ray Data) vs the Serve endpoint",
        "model": args.model, "texts": len(texts), "dim": manifest["dim"],
        "embed_job": {"actors": args.actors, "wall_s": round(job_s, 2),
                      "texts_per_s": round(len(texts) / job_s, 2),
                      "pipeline_texts_per_s": manifest["texts_per_s"]},
        "serve": {"clients": args.clients, "texts_per_request": args.batch,
                  "wall_s": round(serve_s, 2), "texts": served,
                  "texts_per_s": round(served / serve_s, 2) if serve_s else None},
        "ratio_job_vs_serve": round((len(texts) / job_s) / (served / serve_s), 2) if served else None,
        "same_vectors": same,
        "host": {"cpus": os.cpu_count(), "load_avg_1m": os.getloadavg()[0],
                 "python": platform.python_version()},
    }
    print(json.dumps(result, indent=2))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
