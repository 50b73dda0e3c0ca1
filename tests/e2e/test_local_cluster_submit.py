"""A real two-node Ray cluster on 127.0.0.1 takes `l2vg submit pipeline` and runs it to the end.

The cluster is started the way a user starts one (`ray start --head`, then `ray start --address`
for a worker) by `l2vg_ray.local_cluster.LocalRayCluster`: each `ray start --block` in its own
process group with its own temp dir and free ports, so it never touches another Ray instance on
this machine. The jobs use this repository's .venv: `ray start` runs
with .venv/bin first on PATH, so the job's `python` is the same environment (no runtime_env pip).
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from l2vg_ray.local_cluster import STARTUP_TIMEOUT_S, LocalRayCluster

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
JOB_TIMEOUT_S = 900

pytestmark = pytest.mark.timeout(JOB_TIMEOUT_S + 2 * STARTUP_TIMEOUT_S)


@pytest.fixture(scope="module")
def local_cluster():
    """Head + one worker node, each a `ray start --block` process we own and stop by id."""
    with LocalRayCluster(head_cpus=1) as cluster:
        cluster.add_worker(num_cpus=1)
        yield cluster


@pytest.fixture
def job_config(tmp_path, tiny_llm_dir, tiny_teacher_dir, tiny_queries_file):
    """A tiny experiment YAML outside the repo: tiny models, transformers, a few steps, one small
    offline eval task on fixture data (written where the eval stage looks first), so the test
    never depends on a registry archive."""
    from l2vg_ray.eval.tasks.synthetic import write_synthetic_offline_data

    out = tmp_path / "out"
    cache = tmp_path / "cache"
    write_synthetic_offline_data(cache)
    text = f"""\
name: cluster-e2e
output_dir: {out}
cache_dir: {cache}
model:
  llm: {tiny_llm_dir}
  teacher: {tiny_teacher_dir}
  n_thought: 2
  n_compression: 2
  max_length: 64
  max_response_length: 16
generate:
  queries: {{source: file, path: {tiny_queries_file}}}
  backend: transformers
  max_tokens: 8
  batch_size: 6
  num_cpus_per_actor: 1
teacher: {{batch_size: 12, num_cpus_per_actor: 1}}
train:
  batch_size: 4
  max_steps: 2
  warmup_steps: 1
  log_every: 1
  checkpoint_every: 2
  cpus_per_worker: 1
eval:
  suite: list
  tasks: [OfflineSTSBenchmark]
  cache_dir: {tmp_path / "embedding-cache"}
  batch_size: 16
  max_docs: 20
  max_concurrency: 1
cluster:
  env_vars: {{HF_HUB_OFFLINE: "1", TOKENIZERS_PARALLELISM: "false"}}
"""
    path = tmp_path / "cluster-e2e.yaml"
    path.write_text(text)
    return path, out


def _submit(cluster: LocalRayCluster, config: Path, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "l2vg_ray.cli", "submit", "pipeline", "--address",
         cluster.dashboard, "--config", str(config), "--working-dir", str(REPO), *extra],
        cwd=REPO, env=cluster.env, capture_output=True, text=True, timeout=JOB_TIMEOUT_S,
    )


def test_submit_pipeline_to_a_two_node_cluster(local_cluster, job_config):
    from ray.job_submission import JobStatus, JobSubmissionClient

    config, out = job_config
    done = _submit(local_cluster, config)
    logs = done.stdout + done.stderr
    assert done.returncode == 0, f"submit failed:\n{logs[-6000:]}\n{local_cluster.tail()}"
    assert "SUCCEEDED" in logs

    client = JobSubmissionClient(local_cluster.dashboard)
    (job,) = [j for j in client.list_jobs() if j.entrypoint.startswith("python jobs/pipeline.py")]
    assert job.status == JobStatus.SUCCEEDED
    assert job.runtime_env["working_dir"].startswith(("gcs://", "file://"))  # uploaded, not a path

    markers = {s: json.loads((out / d / "_SUCCESS.json").read_text())
               for s, d in [("generate", "data"), ("train", "train"), ("eval", "eval")]}
    assert list((out / "data").glob("*.parquet")) or list((out / "data").rglob("*.parquet"))
    assert (out / "train" / "final" / "l2vg_config.json").is_file()
    assert markers["train"]["summary"]["steps"] == 2
    evaluation = markers["eval"]["summary"]
    assert evaluation["failed"] == {}
    assert isinstance(evaluation["scores"]["OfflineSTSBenchmark"], float)
    assert [p for p in (out / "eval").rglob("*") if p.is_file() and not p.name.startswith("_")]

    # The same job resubmitted in the plain `ray job submit` form, with --serve: every stage is
    # found done and skipped, then the encoder is served and answers one real HTTP request.
    from l2vg_ray.submit import EXCLUDES

    job_id = client.submit_job(
        entrypoint=f"python jobs/pipeline.py --config {config} --serve serve.port=0",
        runtime_env={"working_dir": str(REPO), "excludes": EXCLUDES},
    )
    deadline = time.time() + JOB_TIMEOUT_S
    while (status := client.get_job_status(job_id)) not in {
        JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED
    } and time.time() < deadline:
        time.sleep(2)
    second_logs = client.get_job_logs(job_id)
    assert status == JobStatus.SUCCEEDED, second_logs[-4000:]
    for stage, d in [("generate", "data"), ("train", "train"), ("eval", "eval")]:
        assert f"[{stage}] skipped" in second_logs
        marker = json.loads((out / d / "_SUCCESS.json").read_text())
        assert marker["started_at"] == markers[stage]["started_at"], f"{stage} ran again"
    dim = markers["train"]["summary"]["teacher_dim"]
    assert re.search(rf"POST http://127\.0\.0\.1:\d+/v1/embeddings -> {dim} dims", second_logs)
