"""A real two-node Ray cluster on 127.0.0.1 takes `l2vg submit pipeline` and runs it to the end.

The cluster is started the way a user starts one (`ray start --head`, then `ray start --address`
for a worker), each `ray start --block` in its own process group with its own temp dir and free
ports, so it never touches another Ray instance on this machine (`ray stop` would kill every Ray
process of every user: it is not used). The jobs use this repository's .venv: `ray start` runs
with .venv/bin first on PATH, so the job's `python` is the same environment (no runtime_env pip).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
STARTUP_TIMEOUT_S = 180
JOB_TIMEOUT_S = 900

pytestmark = pytest.mark.timeout(JOB_TIMEOUT_S + 2 * STARTUP_TIMEOUT_S)


def _free_ports(n: int) -> list[int]:
    socks = []
    try:
        for _ in range(n):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _node_ports() -> list[str]:
    manager, objects, agent_http, agent_grpc, metrics, runtime_env = _free_ports(6)
    return [
        f"--node-manager-port={manager}",
        f"--object-manager-port={objects}",
        f"--dashboard-agent-listen-port={agent_http}",
        f"--dashboard-agent-grpc-port={agent_grpc}",
        f"--metrics-export-port={metrics}",
        f"--runtime-env-agent-port={runtime_env}",
    ]


class LocalCluster:
    """Head + one worker node, each a `ray start --block` process we own and stop by id."""

    def __init__(self) -> None:
        # Short: Ray puts unix sockets under it and their paths are limited to ~107 bytes. One
        # per node: nodes sharing a temp dir share `runtime_resources/`, and one node's runtime-env
        # agent then deletes the job's unpacked working dir while the driver still runs in it.
        self.temp_dirs = [tempfile.mkdtemp(prefix=f"l2vg{n}", dir="/tmp") for n in ("h", "w")]
        self.gcs_port, self.dashboard_port, self.client_port = _free_ports(3)
        self.dashboard = f"http://127.0.0.1:{self.dashboard_port}"
        self.env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"}
        self.env.pop("RAY_ADDRESS", None)
        self.env.update(RAY_AUTH_MODE="disabled", HF_HUB_OFFLINE="1", OMP_WAIT_POLICY="PASSIVE")
        self.procs: list[subprocess.Popen] = []
        self.logs: list[Path] = []

    def _start(self, name: str, args: list[str], temp_dir: str) -> None:
        log = Path(temp_dir) / f"{name}.log"
        self.logs.append(log)
        cmd = [str(BIN / "ray"), "start", "--block", f"--temp-dir={temp_dir}",
               "--node-ip-address=127.0.0.1", "--num-cpus=1",
               "--object-store-memory=150000000", *_node_ports(), *args]
        with log.open("w") as out:
            self.procs.append(subprocess.Popen(
                cmd, stdout=out, stderr=subprocess.STDOUT, env=self.env, start_new_session=True
            ))

    def start(self) -> None:
        self._start("head", [
            "--head", f"--port={self.gcs_port}", "--dashboard-host=127.0.0.1",
            f"--dashboard-port={self.dashboard_port}", f"--ray-client-server-port={self.client_port}",
        ], self.temp_dirs[0])
        self._wait_for_nodes(1)
        # `ray start` gives a raylet a fixed 30 s to register; on a saturated machine the worker
        # can miss it and exit, so it gets a few attempts (the head's processes stay up).
        for attempt in range(3):
            self._start(
                f"worker-{attempt}", [f"--address=127.0.0.1:{self.gcs_port}"], self.temp_dirs[1]
            )
            try:
                self._wait_for_nodes(2)
                return
            except ProcessLookupError:
                if attempt == 2:
                    raise

    def _wait_for_nodes(self, n: int) -> None:
        from ray.util.state import list_nodes

        deadline = time.time() + STARTUP_TIMEOUT_S
        alive = 0
        while time.time() < deadline:
            if self.procs[0].poll() is not None:
                raise RuntimeError(f"the head's `ray start` exited:\n{self.tail()}")
            if self.procs[-1].poll() is not None:
                raise ProcessLookupError(f"`ray start` exited early:\n{self.tail()}")
            try:
                alive = sum(node.state == "ALIVE" for node in list_nodes(address=self.dashboard))
            except Exception:  # the dashboard is not up yet
                alive = 0
            if alive >= n:
                return
            time.sleep(2)
        raise TimeoutError(f"{alive}/{n} Ray nodes alive after {STARTUP_TIMEOUT_S}s:\n{self.tail()}")

    def tail(self, chars: int = 3000) -> str:
        return "\n".join(f"--- {p.name}\n{p.read_text()[-chars:]}" for p in self.logs if p.exists())

    def stop(self) -> None:
        """SIGTERM each `ray start --block` (it stops the processes it started), then SIGKILL
        what is left of its process group and any process still running from our temp dir."""
        for proc in reversed(self.procs):
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in reversed(self.procs):
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        import psutil

        for p in psutil.process_iter(["pid", "cmdline"]):
            cmdline = " ".join(p.info["cmdline"] or [])
            if any(d in cmdline for d in self.temp_dirs) and p.pid != os.getpid():
                try:
                    p.kill()
                except psutil.Error:
                    pass
        for d in self.temp_dirs:
            shutil.rmtree(d, ignore_errors=True)


@pytest.fixture(scope="module")
def local_cluster():
    cluster = LocalCluster()
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()


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


def _submit(cluster: LocalCluster, config: Path, *extra: str) -> subprocess.CompletedProcess:
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
