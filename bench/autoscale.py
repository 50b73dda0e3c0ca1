"""Autoscaling you can watch: ``l2vg eval`` and ``l2vg serve`` on a real autoscaling Ray cluster.

One local cluster (``l2vg_ray.local_cluster``): a head offering 1 CPU and no eval / serve slot,
and two worker types that Ray's own autoscaler (fake multi-node provider: every node is a real
raylet) starts while work waits for their resources and stops after ``--idle-timeout`` idle:

- ``eval-worker``  {CPU: 1, eval_slot: 1}, 0..3 nodes
- ``serve-worker`` {CPU: 1, serve_slot: 1}, 0..3 nodes

Two runs, each sampled every second through the dashboard (alive nodes, tasks waiting for a
node, Serve replicas):

1. **eval**: ``l2vg eval`` of the all-MiniLM-L6-v2 teacher over the offline suite (12 tasks,
   ``--max-docs`` documents each) with ``eval.resources_per_task={eval_slot: 1}`` and 3 tasks in
   flight; then the same evaluation on a fixed local Ray (no slot asked), whose scores must be
   equal; then the wait until every eval node is gone.
2. **serve**: ``l2vg serve`` of the same encoder with ``serve.resources={serve_slot: 1}``, 1..3
   replicas, a target of ``--target`` ongoing requests per replica; a load ramp of HTTP clients
   (16 texts per request), then no load until the replicas and nodes are back to one.

Every node here shares the same CPU cores, so a replica more adds no throughput on this
machine; what is measured is the mechanics: demand -> node -> replica, and back, with nothing
lost. Writes ``bench/results/autoscale.json`` and ``.png``.

    python bench/autoscale.py                 # both runs (~10 min here)
    python bench/autoscale.py --only serve
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import _common  # noqa: F401  (environment and sys.path)
from _common import ROOT

from l2vg_ray.local_cluster import (
    ClusterWatch,
    LocalRayCluster,
    RequestLoad,
    RequestRecord,
    Sample,
    WorkerType,
    free_ports,
    server_process,
)

RESULTS = ROOT / "bench" / "results"
WORK = ROOT / "outputs" / "bench-autoscale"
CONFIG = ROOT / "configs" / "laptop.yaml"
EVAL_WORKERS = WorkerType("eval-worker", {"CPU": 1, "eval_slot": 1}, min_workers=0, max_workers=3)
SERVE_WORKERS = WorkerType("serve-worker", {"CPU": 1, "serve_slot": 1}, min_workers=0,
                           max_workers=3)
MODEL = "EmbeddingModel"  # the Serve deployment that holds the encoder (and autoscales)
# (clients, seconds): the serving ramp
RAMP = ((1, 15), (4, 20), (8, 45))


def l2vg(command: str, overrides: list[str], env: dict[str, str], log: Path) -> dict[str, Any]:
    """Run ``l2vg <command> --config configs/laptop.yaml <overrides>``; its result JSON."""
    out_dir = WORK / f"out-{log.stem}"
    shutil.rmtree(out_dir, ignore_errors=True)
    with log.open("w") as out:
        done = subprocess.run(
            [sys.executable, "-m", "l2vg_ray.cli", command, "--config", str(CONFIG),
             f"output_dir={out_dir}", *overrides],
            cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT, timeout=3600)
    if done.returncode != 0:
        raise RuntimeError(f"l2vg {command} failed ({done.returncode}); see {log}")
    return json.loads((out_dir / f"{command}_result.json").read_text())


def first(samples: list[Sample], predicate: Any, after: float = 0.0) -> float | None:
    return next((s.t for s in samples if s.t >= after and predicate(s)), None)


def timeline(samples: list[Sample]) -> list[dict[str, Any]]:
    return [{"t": s.t, "nodes": s.nodes, "pending_tasks": s.pending_tasks,
             "replicas": s.replicas_of(MODEL)} for s in samples]


def run_eval(cluster: LocalRayCluster, max_docs: int, idle_timeout_s: float) -> dict[str, Any]:
    common = ["eval.model=teacher", "eval.suite=offline", f"eval.max_docs={max_docs}",
              "eval.max_concurrency=3", "eval.num_cpus_per_task=1"]
    with ClusterWatch(cluster.dashboard, interval_s=1.0, tasks=True) as watch:
        watch.wait_for(lambda s: True, timeout_s=30)
        started = watch.now()
        auto = l2vg("eval", [*common, f"cluster.address={cluster.address}",
                             f"eval.cache_dir={WORK / 'emb-auto'}",
                             "eval.resources_per_task.eval_slot=1"],
                    cluster.env, WORK / "eval-auto.log")
        finished = watch.now()
        watch.wait_for(lambda s: s.nodes == 1, timeout_s=idle_timeout_s + 180)
    s = watch.samples
    print(f"eval on the autoscaling cluster: {finished - started:.0f}s", flush=True)
    fixed_env = {k: v for k, v in cluster.env.items() if k != "RAY_FAKE_CLUSTER"}
    t0 = time.perf_counter()
    fixed = l2vg("eval", [*common, "cluster.num_cpus=2", f"eval.cache_dir={WORK / 'emb-fixed'}"],
                 fixed_env, WORK / "eval-fixed.log")
    fixed_s = time.perf_counter() - t0
    diffs = {t: abs(auto["scores"][t] - v) for t, v in fixed["scores"].items()
             if auto["scores"].get(t) is not None and v is not None}
    first_pending = first(s, lambda x: (x.pending_tasks or 0) > 0, started)
    first_node = first(s, lambda x: x.nodes > s[0].nodes, started)
    last_removal = first(s, lambda x: x.nodes == s[0].nodes, finished)
    return {
        "model": "teacher (all-MiniLM-L6-v2)", "suite": "offline", "max_docs": max_docs,
        "tasks": len(auto["scores"]), "failed_tasks": len(auto["failed"]),
        "initial_nodes": s[0].nodes, "max_nodes": max(x.nodes for x in s),
        "final_nodes": s[-1].nodes, "max_pending_tasks": max(x.pending_tasks or 0 for x in s),
        "scores_equal_fixed_cluster": len(diffs) == len(fixed["scores"]) and max(diffs.values()) < 1e-6,
        "max_abs_score_diff": max(diffs.values()) if diffs else None,
        "wall_s_autoscaling": round(finished - started, 1), "wall_s_fixed_2cpu": round(fixed_s, 1),
        "first_pending_s": first_pending, "first_new_node_s": first_node,
        "pending_to_first_node_s": None if None in (first_pending, first_node)
        else round(first_node - first_pending, 1),
        "finished_s": round(finished, 1),
        "idle_to_scale_down_s": None if last_removal is None else round(last_removal - finished, 1),
        "idle_timeout_s": idle_timeout_s,
        "timeline": timeline(s),
    }


def windows(records: list[RequestRecord], width: float = 2.0) -> list[dict[str, Any]]:
    """Requests/s and latency percentiles per ``width`` seconds of send time."""
    import numpy as np

    if not records:
        return []
    out = []
    end = max(r.t for r in records)
    t = 0.0
    while t <= end:
        got = [r for r in records if t <= r.t < t + width]
        lat = np.array([r.seconds for r in got if r.status == 200]) * 1000
        out.append({"t": round(t + width / 2, 2), "requests_per_s": round(len(got) / width, 2),
                    "p50_ms": round(float(np.percentile(lat, 50)), 1) if len(lat) else None,
                    "p99_ms": round(float(np.percentile(lat, 99)), 1) if len(lat) else None,
                    "failed": sum(r.status != 200 for r in got)})
        t += width
    return out


def run_serve(cluster: LocalRayCluster, target: float, idle_timeout_s: float) -> dict[str, Any]:
    import numpy as np

    port = free_ports(1)[0]
    log = WORK / "serve.log"
    cmd = [sys.executable, "-m", "l2vg_ray.cli", "serve", "--config", str(CONFIG),
           f"output_dir={WORK / 'out-serve'}", f"cluster.address={cluster.address}",
           "serve.model=teacher", "serve.loader=encoder", f"serve.port={port}",
           "serve.min_replicas=1", "serve.max_replicas=3", f"serve.target_ongoing_requests={target}",
           "serve.upscale_delay_s=2", "serve.downscale_delay_s=10", "serve.num_cpus=1",
           "serve.resources.serve_slot=1", "serve.proxy_location=HeadOnly",
           "serve.ready_timeout_s=300", "serve.access_log=false"]
    url = f"http://127.0.0.1:{port}"
    with server_process(cmd, f"{url}/healthz", name="l2vg serve", env=cluster.env, cwd=ROOT,
                        log=log, timeout_s=400, stop_signal=signal.SIGINT):
        body = {"model": "l2vg", "input": [f"a sentence about topic number {i}" for i in range(16)]}
        with ClusterWatch(cluster.dashboard, interval_s=1.0, tasks=False, serve=True) as watch:
            watch.wait_for(lambda s: s.replicas_of(MODEL) == 1, timeout_s=60)
            load_start = watch.now()
            with RequestLoad(f"{url}/v1/embeddings", body, max_clients=8, t0=watch.t0) as load:
                for clients, seconds in RAMP:
                    print(f"serve: {clients} clients for {seconds}s", flush=True)
                    load.set_clients(clients)
                    time.sleep(seconds)
                load.set_clients(0)
            load_stop = watch.now()
            watch.wait_for(lambda s: s.replicas_of(MODEL) == 1 and s.nodes == 2,
                           timeout_s=idle_timeout_s + 240)
            time.sleep(3)
        serving_end = watch.now()
    s = watch.samples
    lat = np.array([r.seconds for r in load.records if r.status == 200]) * 1000
    up = first(s, lambda x: x.replicas_of(MODEL) > 1, load_start)
    new_node = first(s, lambda x: x.nodes > s[0].nodes, load_start)
    down = first(s, lambda x: x.replicas_of(MODEL) == 1, load_stop)
    nodes_down = first(s, lambda x: x.nodes == 2, load_stop)
    return {
        "model": "teacher (all-MiniLM-L6-v2)", "texts_per_request": len(body["input"]),
        "ramp": [{"clients": c, "seconds": t} for c, t in RAMP],
        "target_ongoing_requests": target, "upscale_delay_s": 2, "downscale_delay_s": 10,
        "requests": len(load.records), "failed_requests": len(load.failed()),
        "failures": [r.error for r in load.failed()[:5]],
        "p50_ms": round(float(np.percentile(lat, 50)), 1) if len(lat) else None,
        "p99_ms": round(float(np.percentile(lat, 99)), 1) if len(lat) else None,
        "initial_replicas": s[0].replicas_of(MODEL),
        "max_replicas": max(x.replicas_of(MODEL) for x in s),
        "final_replicas": s[-1].replicas_of(MODEL),
        "initial_nodes": s[0].nodes, "max_nodes": max(x.nodes for x in s), "final_nodes": s[-1].nodes,
        "load_start_s": round(load_start, 1), "load_stop_s": round(load_stop, 1),
        "load_to_second_replica_s": None if up is None else round(up - load_start, 1),
        "load_to_new_node_s": None if new_node is None else round(new_node - load_start, 1),
        "idle_to_one_replica_s": None if down is None else round(down - load_stop, 1),
        "idle_to_node_removal_s": None if nodes_down is None else round(nodes_down - load_stop, 1),
        "watched_s": round(serving_end, 1),
        "timeline": timeline(s), "load": windows(load.records),
    }


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = [k for k in ("eval", "serve") if k in result]
    fig, axes = plt.subplots(len(runs), 1, figsize=(10, 4 * len(runs)), squeeze=False)
    for ax, run in zip(axes[:, 0], runs, strict=True):
        r = result[run]
        tl = r["timeline"]
        t = [x["t"] for x in tl]
        ax.step(t, [x["nodes"] for x in tl], where="post", label="alive nodes (head included)")
        if run == "eval":
            ax.step(t, [x["pending_tasks"] or 0 for x in tl], where="post",
                    label="tasks waiting for a node")
            ax.axvline(r["finished_s"], color="grey", ls=":", label="eval finished")
            ax.set_title(f"l2vg eval, offline suite ({r['tasks']} tasks, 3 in flight): "
                         f"{r['failed_tasks']} failed, scores equal to a fixed cluster: "
                         f"{r['scores_equal_fixed_cluster']}")
        else:
            ax.step(t, [x["replicas"] for x in tl], where="post", label="model replicas")
            ax.axvspan(r["load_start_s"], r["load_stop_s"], color="orange", alpha=0.1,
                       label="load ramp")
            ax2 = ax.twinx()
            w = r["load"]
            ax2.plot([x["t"] for x in w], [x["requests_per_s"] for x in w], "g-", alpha=0.5,
                     label="requests/s")
            ax2.plot([x["t"] for x in w], [(x["p99_ms"] or 0) / 100 for x in w], "r--",
                     alpha=0.5, label="p99 latency (100 ms)")
            ax2.legend(loc="upper right")
            ax.set_title(f"l2vg serve under a load ramp: {r['requests']} requests, "
                         f"{r['failed_requests']} failed")
        ax.set_xlabel("seconds")
        ax.legend(loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--only", choices=("eval", "serve"))
    ap.add_argument("--max-docs", type=int, default=100)
    ap.add_argument("--target", type=float, default=2.0, help="serve.target_ongoing_requests")
    ap.add_argument("--idle-timeout", type=float, default=15.0, help="seconds")
    args = ap.parse_args()
    WORK.mkdir(parents=True, exist_ok=True)
    out = RESULTS / "autoscale.json"
    result: dict[str, Any] = json.loads(out.read_text()) if args.only and out.exists() else {}
    cluster = LocalRayCluster(head_cpus=1, worker_types=[EVAL_WORKERS, SERVE_WORKERS],
                              idle_timeout_s=args.idle_timeout)
    with cluster:
        result["machine"] = {"cpus": os.cpu_count(), "python": platform.python_version()}
        result["cluster"] = {
            "head": {"CPU": 1},
            "worker_types": [{"name": w.name, "resources": w.resources, "min_workers": w.min_workers,
                              "max_workers": w.max_workers} for w in (EVAL_WORKERS, SERVE_WORKERS)],
            "idle_timeout_s": args.idle_timeout, "autoscaler": "Ray's (v1), fake multi-node provider",
        }
        if args.only in (None, "eval"):
            result["eval"] = run_eval(cluster, args.max_docs, args.idle_timeout)
            print(json.dumps({k: v for k, v in result["eval"].items() if k != "timeline"}, indent=1))
        if args.only in (None, "serve"):
            result["serve"] = run_serve(cluster, args.target, args.idle_timeout)
            print(json.dumps({k: v for k, v in result["serve"].items()
                              if k not in ("timeline", "load")}, indent=1))
    RESULTS.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    plot(result, out.with_suffix(".png"))
    print(f"wrote {out} and {out.with_suffix('.png')}")


if __name__ == "__main__":
    main()
