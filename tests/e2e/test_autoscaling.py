"""Evaluation and serving scale out and back in on a real autoscaling Ray cluster on this machine.

The cluster (``l2vg_ray.local_cluster``): a head offering 1 CPU and no eval / serve slot, and two
worker types the real Ray autoscaler starts on demand (fake multi-node provider: each node is a
real raylet) and stops after ``IDLE_TIMEOUT_S`` idle. ``l2vg eval`` and ``l2vg serve`` run as a
user runs them, with ``cluster.address`` pointing at it; the test only watches through the
dashboard and sends HTTP requests. ``bench/autoscale.py`` records the same runs at a real model's
size, with their timeline.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from l2vg_ray.local_cluster import (
    ClusterWatch,
    LocalRayCluster,
    RequestLoad,
    WorkerType,
    free_ports,
    server_process,
)

REPO = Path(__file__).resolve().parents[2]
IDLE_TIMEOUT_S = 8.0
EVAL_WORKERS = WorkerType("eval-worker", {"CPU": 1, "eval_slot": 1}, min_workers=0, max_workers=3)
SERVE_WORKERS = WorkerType("serve-worker", {"CPU": 1, "serve_slot": 1}, min_workers=0,
                           max_workers=3)
# Scale-down: the autoscaler's idle timeout, plus its loop and a raylet's exit, on a busy machine.
SCALE_DOWN_TIMEOUT_S = IDLE_TIMEOUT_S + 120
MODEL = "EmbeddingModel"  # the Serve deployment that holds the encoder (and autoscales)

pytestmark = pytest.mark.timeout(1200)


@pytest.fixture(scope="module")
def cluster():
    c = LocalRayCluster(head_cpus=1, worker_types=[EVAL_WORKERS, SERVE_WORKERS],
                        idle_timeout_s=IDLE_TIMEOUT_S)
    try:
        c.start()
    except Exception as e:  # noqa: BLE001 - the only reason to skip: no cluster on this machine
        pytest.skip(f"a local autoscaling Ray cluster (ray start --head --autoscaling-config, "
                    f"fake multi-node provider) could not start on this machine: {e}")
    try:
        yield c
    finally:
        c.stop()


def _models(tmp_path: Path, tiny_llm_dir: Path, tiny_teacher_dir: Path) -> list[str]:
    return [
        f"output_dir={tmp_path / 'out'}", f"cache_dir={tmp_path / 'cache'}",
        f"model.llm={tiny_llm_dir}", f"model.teacher={tiny_teacher_dir}",
        "model.n_thought=2", "model.n_compression=2", "model.max_length=64",
    ]


def _l2vg(command: str, overrides: list[str], env: dict[str, str], log: Path,
          timeout_s: float = 600) -> subprocess.CompletedProcess:
    with log.open("w") as out:
        return subprocess.run([sys.executable, "-m", "l2vg_ray.cli", command, *overrides],
                              cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT,
                              timeout=timeout_s)


def test_eval_scales_out_while_tasks_wait_and_back_in_when_idle(
    cluster, tmp_path, tiny_llm_dir, tiny_teacher_dir
):
    from l2vg_ray.eval.tasks.synthetic import write_synthetic_offline_data

    write_synthetic_offline_data(tmp_path / "cache")
    common = [*_models(tmp_path, tiny_llm_dir, tiny_teacher_dir), "eval.model=mean-pool",
              "eval.suite=offline", "eval.max_docs=40", "eval.batch_size=8",
              "eval.max_concurrency=3", "eval.num_cpus_per_task=1", "eval.max_retries=1"]
    auto_out, fixed_out = tmp_path / "auto", tmp_path / "fixed"

    with ClusterWatch(cluster.dashboard, interval_s=1.0, tasks=True) as watch:
        done = _l2vg("eval", [
            *common, f"cluster.address={cluster.address}", f"eval.output_dir={auto_out}",
            f"eval.cache_dir={tmp_path / 'emb-auto'}", "eval.resources_per_task.eval_slot=1",
        ], cluster.env, tmp_path / "eval-auto.log")
        assert done.returncode == 0, (tmp_path / "eval-auto.log").read_text()[-6000:]
        finished = watch.now()
        watch.wait_for(lambda s: s.nodes == 1, timeout_s=SCALE_DOWN_TIMEOUT_S)

    samples = watch.samples
    during = [s for s in samples if s.t <= finished]
    assert samples[0].nodes == 1, samples[:3]  # the head alone: no eval slot until demand
    assert max(s.pending_tasks or 0 for s in during) > 0, "no eval task ever waited for a node"
    assert max(s.nodes for s in during) >= 2, "the autoscaler added no node for the eval tasks"
    assert max(s.nodes for s in samples) <= 1 + EVAL_WORKERS.max_workers
    assert samples[-1].nodes == 1  # every eval node removed after the idle timeout

    # Every task finished, with the scores of the same run on a fixed local Ray (no slot asked).
    auto = json.loads((tmp_path / "out" / "eval_result.json").read_text())
    (tmp_path / "out" / "eval_result.json").rename(tmp_path / "eval_result_auto.json")
    assert auto["failed"] == {}
    assert len(auto["scores"]) == 12 and all(v is not None for v in auto["scores"].values())
    fixed_env = {k: v for k, v in cluster.env.items() if k != "RAY_FAKE_CLUSTER"}
    done = _l2vg("eval", [*common, "cluster.num_cpus=2", f"eval.output_dir={fixed_out}",
                          f"eval.cache_dir={tmp_path / 'emb-fixed'}"],
                 fixed_env, tmp_path / "eval-fixed.log")
    assert done.returncode == 0, (tmp_path / "eval-fixed.log").read_text()[-6000:]
    fixed = json.loads((tmp_path / "out" / "eval_result.json").read_text())
    assert fixed["scores"].keys() == auto["scores"].keys()
    for task, score in fixed["scores"].items():
        assert auto["scores"][task] == pytest.approx(score, abs=1e-6), task


def test_serve_scales_out_under_load_and_back_in_without_losing_a_request(
    cluster, tmp_path, tiny_llm_dir, tiny_teacher_dir
):
    port = free_ports(1)[0]
    log = tmp_path / "serve.log"
    overrides = [
        *_models(tmp_path, tiny_llm_dir, tiny_teacher_dir), f"cluster.address={cluster.address}",
        "serve.model=teacher", "serve.loader=encoder", f"serve.port={port}",
        "serve.min_replicas=1", "serve.max_replicas=3", "serve.target_ongoing_requests=1",
        "serve.upscale_delay_s=1", "serve.downscale_delay_s=5", "serve.num_cpus=1",
        "serve.resources.serve_slot=1", "serve.proxy_location=HeadOnly",
        "serve.ready_timeout_s=300",
    ]
    url = f"http://127.0.0.1:{port}"
    body = {"model": "l2vg", "input": [f"a sentence about topic {i}" for i in range(16)]}
    cmd = [sys.executable, "-m", "l2vg_ray.cli", "serve", *overrides]
    with server_process(cmd, f"{url}/healthz", name="l2vg serve", env=cluster.env, cwd=REPO,
                        log=log, timeout_s=400, stop_signal=signal.SIGINT), \
            ClusterWatch(cluster.dashboard, interval_s=1.0, tasks=False, serve=True) as watch:
        watch.wait_for(lambda s: s.replicas_of(MODEL) == 1, timeout_s=60)
        with RequestLoad(f"{url}/v1/embeddings", body, max_clients=8, t0=watch.t0) as load:
            load.set_clients(1)
            time.sleep(3)
            load.set_clients(8)  # the ramp: 8 clients on a target of 1 ongoing per replica
            watch.wait_for(lambda s: s.replicas_of(MODEL) >= 2, timeout_s=240)
            time.sleep(5)
            load.set_clients(0)
        watch.wait_for(lambda s: s.replicas_of(MODEL) == 1 and s.nodes == 2,
                       timeout_s=SCALE_DOWN_TIMEOUT_S + 60)

    samples = watch.samples
    peak_nodes = max(s.nodes for s in samples)
    assert max(s.replicas_of(MODEL) for s in samples) >= 2
    assert peak_nodes >= 3, "the added replica got no node of its own"  # head + 2 serve nodes
    assert samples[-1].nodes == 2 and samples[-1].replicas_of(MODEL) == 1
    assert len(load.records) > 0
    assert load.failed() == [], load.failed()[:5]
