"""Ray clusters on this machine, started the way a user starts one, for the e2e tests and benchmarks.

``LocalRayCluster`` runs ``ray start --head --block`` (and, for a fixed cluster, ``ray start
--address ... --block`` workers) on 127.0.0.1, each in its own process group, temp dir and free
ports, so it never touches another Ray instance here: ``ray stop`` would kill every Ray process of
every user, and so would ``ray.cluster_utils.AutoscalingCluster``, which calls it (and whose
``fake_multi_node/example.yaml`` the pip wheel lacks).

With ``worker_types`` the head runs Ray's real autoscaler (``--autoscaling-config``) over its
fake multi-node provider: a worker "node" is a real raylet process started by the autoscaler when
tasks or actors wait for the resources its type offers, and stopped after ``idle_timeout_s``.
Scheduling, placement and scale-down are Ray's own. ``autoscaling_config`` writes the same
``available_node_types`` / ``min_workers`` / ``max_workers`` / ``idle_timeout_minutes`` as a
cluster-launcher YAML (``cluster/aws/cluster.yaml``) or a KubeRay worker group.

``ClusterWatch`` samples a running cluster through its dashboard only (no ``ray.init`` in the
watching process): alive nodes, tasks waiting for a node, and Serve replicas per deployment.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

BIN = Path(sys.executable).parent
STARTUP_TIMEOUT_S = 180.0
HEAD_TYPE = "ray.head.default"
# Ray's autoscaler loop period on the local cluster (Ray's own tests use 1 s; the default is 5 s).
AUTOSCALER_UPDATE_INTERVAL_S = 1
# A task in this state waits for a node with the resources it asked for: autoscaler demand.
PENDING_STATE = "PENDING_NODE_ASSIGNMENT"


def free_ports(n: int) -> list[int]:
    """``n`` distinct TCP ports free on 127.0.0.1 right now."""
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


def node_port_args() -> list[str]:
    """``ray start`` flags giving one node its own free ports (never Ray's fixed defaults)."""
    manager, objects, agent_http, agent_grpc, metrics, runtime_env = free_ports(6)
    return [
        f"--node-manager-port={manager}",
        f"--object-manager-port={objects}",
        f"--dashboard-agent-listen-port={agent_http}",
        f"--dashboard-agent-grpc-port={agent_grpc}",
        f"--metrics-export-port={metrics}",
        f"--runtime-env-agent-port={runtime_env}",
    ]


@dataclass(frozen=True)
class WorkerType:
    """One autoscaled node type: what a node offers (``CPU``, ``GPU``, custom resources such as
    ``eval_slot``) and how many of them the autoscaler may run."""

    name: str
    resources: dict[str, float]
    min_workers: int = 0
    max_workers: int = 1
    object_store_bytes: int = 100_000_000

    def __post_init__(self) -> None:
        if not 0 <= self.min_workers <= self.max_workers:
            raise ValueError(
                f"WorkerType {self.name!r}: min_workers={self.min_workers}, "
                f"max_workers={self.max_workers}; need 0 <= min_workers <= max_workers."
            )
        if "CPU" not in self.resources:
            raise ValueError(f"WorkerType {self.name!r}: resources {self.resources} lack 'CPU'.")


def autoscaling_config(
    *, head_cpus: float, worker_types: Sequence[WorkerType], gcs_address: str,
    idle_timeout_s: float, upscaling_speed: float = 1.0,
) -> dict[str, Any]:
    """The autoscaler's cluster config for Ray's fake multi-node provider (the layout of the
    cluster launcher's YAML): the head offers ``head_cpus`` CPUs and nothing else."""
    types: dict[str, Any] = {
        HEAD_TYPE: {"resources": {"CPU": head_cpus}, "node_config": {}, "max_workers": 0},
    }
    for w in worker_types:
        types[w.name] = {
            "resources": {**w.resources, "object_store_memory": w.object_store_bytes},
            "node_config": {},
            "min_workers": w.min_workers,
            "max_workers": w.max_workers,
        }
    return {
        "cluster_name": "l2vg-local",
        "max_workers": sum(w.max_workers for w in worker_types),
        "provider": {
            "type": "fake_multinode",
            "use_node_id_as_ip": True,
            "disable_node_updaters": True,
            "disable_launch_config_check": True,
            "gcs_address": gcs_address,  # else the provider assumes Ray's fixed port 6379
        },
        "available_node_types": types,
        "head_node_type": HEAD_TYPE,
        "upscaling_speed": upscaling_speed,
        "idle_timeout_minutes": idle_timeout_s / 60.0,
        "auth": {}, "docker": {}, "file_mounts": {}, "cluster_synced_files": [],
        "file_mounts_sync_continuously": False, "rsync_exclude": [], "rsync_filter": [],
        "initialization_commands": [], "setup_commands": [], "head_setup_commands": [],
        "worker_setup_commands": [], "head_start_ray_commands": [], "worker_start_ray_commands": [],
    }


class LocalRayCluster:
    """A head (with the autoscaler when ``worker_types`` is given) and the workers added with
    ``add_worker``; every process is ours and ``stop`` ends exactly those."""

    def __init__(
        self, *, head_cpus: float = 1, worker_types: Sequence[WorkerType] = (),
        idle_timeout_s: float = 10.0, env: dict[str, str] | None = None,
        startup_timeout_s: float = STARTUP_TIMEOUT_S,
    ) -> None:
        self.head_cpus = head_cpus
        self.worker_types = tuple(worker_types)
        self.idle_timeout_s = idle_timeout_s
        self.startup_timeout_s = startup_timeout_s
        self.gcs_port, self.dashboard_port, self.client_port = free_ports(3)
        self.address = f"127.0.0.1:{self.gcs_port}"
        self.dashboard = f"http://127.0.0.1:{self.dashboard_port}"
        # Short: Ray puts unix sockets under it (paths are limited to ~107 bytes). One per node
        # started with `ray start`: nodes sharing a temp dir share `runtime_resources/`, and one
        # node's runtime-env agent then deletes a job's unpacked working dir under another.
        self.temp_dirs: list[str] = []
        self.env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"}
        self.env.pop("RAY_ADDRESS", None)
        self.env.update(RAY_AUTH_MODE="disabled", HF_HUB_OFFLINE="1", OMP_WAIT_POLICY="PASSIVE")
        if self.worker_types:
            self.env.update(RAY_FAKE_CLUSTER="1",
                            AUTOSCALER_UPDATE_INTERVAL_S=str(AUTOSCALER_UPDATE_INTERVAL_S))
        self.env.update(env or {})
        self.procs: list[subprocess.Popen] = []
        self.logs: list[Path] = []

    def __enter__(self) -> LocalRayCluster:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _temp_dir(self, name: str) -> str:
        d = tempfile.mkdtemp(prefix=f"l2vg{name[0]}", dir="/tmp")
        self.temp_dirs.append(d)
        return d

    def _start(self, name: str, args: list[str], num_cpus: float,
               temp_dir: str | None = None) -> None:
        temp_dir = temp_dir or self._temp_dir(name)
        log = Path(temp_dir) / f"{name}.log"
        self.logs.append(log)
        cmd = [str(BIN / "ray"), "start", "--block", f"--temp-dir={temp_dir}",
               "--node-ip-address=127.0.0.1", f"--num-cpus={num_cpus:g}",
               "--object-store-memory=150000000", *node_port_args(), *args]
        with log.open("w") as out:
            self.procs.append(subprocess.Popen(
                cmd, stdout=out, stderr=subprocess.STDOUT, env=self.env, start_new_session=True
            ))

    def start(self) -> LocalRayCluster:
        """Start the head and wait until it is alive (its dashboard answers)."""
        args = ["--head", f"--port={self.gcs_port}", "--dashboard-host=127.0.0.1",
                f"--dashboard-port={self.dashboard_port}",
                f"--ray-client-server-port={self.client_port}"]
        head_dir = self._temp_dir("head")  # the first: tail() reads the autoscaler's log there
        if self.worker_types:
            config = autoscaling_config(
                head_cpus=self.head_cpus, worker_types=self.worker_types,
                gcs_address=self.address, idle_timeout_s=self.idle_timeout_s)
            path = Path(head_dir) / "autoscaling.json"
            path.write_text(json.dumps(config, indent=2))
            args.append(f"--autoscaling-config={path}")
        self._start("head", args, self.head_cpus, head_dir)
        try:
            self.wait_for_nodes(1)
        except BaseException:
            self.stop()
            raise
        return self

    def add_worker(self, num_cpus: float = 1, *, attempts: int = 3) -> None:
        """A fixed worker node (``ray start --address``). ``ray start`` gives a raylet a fixed
        30 s to register; on a saturated machine it can miss that and exit, so it gets a few
        attempts (the head's processes stay up)."""
        want = self.alive_nodes() + 1
        for attempt in range(attempts):
            self._start(f"worker-{attempt}", [f"--address={self.address}"], num_cpus)
            try:
                self.wait_for_nodes(want)
                return
            except ProcessLookupError:
                if attempt == attempts - 1:
                    raise

    def alive_nodes(self) -> int:
        """Nodes in state ALIVE (0 while the dashboard is not up)."""
        try:
            return len(list_alive_nodes(self.dashboard))
        except Exception:  # the dashboard is not up yet
            return 0

    def wait_for_nodes(self, n: int) -> None:
        """Wait until at least ``n`` nodes are alive."""
        deadline = time.time() + self.startup_timeout_s
        alive = 0
        while time.time() < deadline:
            if self.procs[0].poll() is not None:
                raise RuntimeError(f"the head's `ray start` exited:\n{self.tail()}")
            if self.procs[-1].poll() is not None:
                raise ProcessLookupError(f"`ray start` exited early:\n{self.tail()}")
            alive = self.alive_nodes()
            if alive >= n:
                return
            time.sleep(1)
        raise TimeoutError(
            f"{alive}/{n} Ray nodes alive after {self.startup_timeout_s:.0f}s:\n{self.tail()}")

    def tail(self, chars: int = 3000) -> str:
        """The end of each ``ray start`` log and of the autoscaler's log (for failures)."""
        logs = [p for p in self.logs if p.exists()]
        if self.temp_dirs:
            logs += sorted(Path(self.temp_dirs[0]).glob("session_latest/logs/monitor.*"))
        return "\n".join(f"--- {p.name}\n{p.read_text(errors='replace')[-chars:]}" for p in logs)

    def stop(self) -> None:
        """SIGTERM each ``ray start --block`` (it stops what it started), then SIGKILL what is
        left of its process group and any process still running from our temp dirs or against
        our GCS (the autoscaler's nodes), and remove the temp dirs."""
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
        kill_processes_of(self.temp_dirs, self.address)
        for d in self.temp_dirs:
            shutil.rmtree(d, ignore_errors=True)


def kill_processes_of(temp_dirs: Iterable[str], gcs_address: str) -> int:
    """SIGKILL every process (but this one) running from one of ``temp_dirs`` (unique random
    names) or given exactly ``gcs_address`` (``--gcs-address=127.0.0.1:<port>``)."""
    import psutil

    dirs = [d for d in temp_dirs if d]
    killed = 0
    for p in psutil.process_iter(["pid", "cmdline"]):
        args = p.info["cmdline"] or []
        ours = any(d in a for d in dirs for a in args) or any(
            a == gcs_address or a.endswith(f"={gcs_address}") for a in args)
        if ours and p.pid != os.getpid():
            try:
                p.kill()
                killed += 1
            except psutil.Error:
                pass
    return killed


def list_alive_nodes(dashboard: str) -> list[Any]:
    from ray.util.state import list_nodes

    return list_nodes(address=dashboard, filters=[("state", "=", "ALIVE")], timeout=10,
                      raise_on_missing_output=False)


def pending_tasks(dashboard: str) -> int:
    """Tasks waiting for a node with the resources they asked for."""
    from ray.util.state import list_tasks

    return len(list_tasks(address=dashboard, filters=[("state", "=", PENDING_STATE)],
                          limit=10000, timeout=10, raise_on_missing_output=False))


def serve_replicas(dashboard: str) -> dict[str, int]:
    """RUNNING replicas per Serve deployment (``app/deployment``), from the dashboard's Serve API;
    empty while Serve is not running."""
    import httpx

    r = httpx.get(f"{dashboard}/api/serve/applications/", timeout=10.0)
    if r.status_code != 200:
        return {}
    out: dict[str, int] = {}
    for app_name, app in (r.json().get("applications") or {}).items():
        for name, dep in (app.get("deployments") or {}).items():
            out[f"{app_name}/{name}"] = sum(
                rep.get("state") == "RUNNING" for rep in dep.get("replicas") or [])
    return out


@dataclass
class Sample:
    t: float  # seconds since the watch started
    nodes: int
    pending_tasks: int | None = None
    replicas: dict[str, int] = field(default_factory=dict)  # RUNNING, per app/deployment

    def replicas_of(self, deployment: str) -> int:
        """RUNNING replicas of ``deployment`` (in any Serve application)."""
        return sum(n for name, n in self.replicas.items() if name.endswith(f"/{deployment}"))


class ClusterWatch:
    """Samples the cluster every ``interval_s`` in a thread (``with ClusterWatch(...) as w``):
    alive nodes, and optionally tasks waiting for a node and Serve replicas. A sample whose
    query failed repeats the last value (the dashboard can be slow on a busy machine)."""

    def __init__(self, dashboard: str, *, interval_s: float = 1.0, tasks: bool = True,
                 serve: bool = False) -> None:
        self.dashboard, self.interval_s = dashboard, interval_s
        self.tasks, self.serve = tasks, serve
        self.samples: list[Sample] = []
        self.t0 = time.monotonic()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="cluster-watch", daemon=True)

    def __enter__(self) -> ClusterWatch:
        self.t0 = time.monotonic()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=30)

    def now(self) -> float:
        return time.monotonic() - self.t0

    def _query(self, fn: Any, last: Any) -> Any:
        try:
            return fn(self.dashboard)
        except Exception:
            return last

    def sample(self) -> Sample | None:
        """Query the dashboard once and record a sample; None (nothing recorded) while the
        dashboard has never answered."""
        last = self.samples[-1] if self.samples else None
        nodes = self._query(lambda d: len(list_alive_nodes(d)), last.nodes if last else None)
        if nodes is None:
            return None
        s = Sample(round(self.now(), 2), nodes)
        if self.tasks:
            s.pending_tasks = self._query(pending_tasks, last.pending_tasks if last else 0)
        if self.serve:
            s.replicas = self._query(serve_replicas, last.replicas if last else {})
        self.samples.append(s)
        return s

    def _run(self) -> None:
        while not self._stop.is_set():
            start = time.monotonic()
            self.sample()
            self._stop.wait(max(0.0, self.interval_s - (time.monotonic() - start)))

    def wait_for(self, predicate: Any, *, timeout_s: float) -> Sample:
        """Block until the latest sample satisfies ``predicate``; TimeoutError after
        ``timeout_s`` naming the last sample."""
        deadline = time.monotonic() + timeout_s
        seen = 0
        while time.monotonic() < deadline:
            if len(self.samples) > seen:
                seen = len(self.samples)
                if predicate(self.samples[-1]):
                    return self.samples[-1]
            time.sleep(0.2)
        raise TimeoutError(f"after {timeout_s:.0f}s the cluster is at {self.samples[-1:]}")


@dataclass(frozen=True)
class RequestRecord:
    t: float  # seconds since the load's t0 when the request was sent
    seconds: float
    status: int | None  # None: no HTTP answer (connection dropped, timeout)
    error: str | None = None


class RequestLoad:
    """HTTP clients posting one request in a loop, as many at once as ``set_clients`` says (a
    load ramp). Every request is recorded: time, latency, status or the connection error."""

    def __init__(self, url: str, body: dict[str, Any], *, max_clients: int = 16,
                 timeout_s: float = 120.0, headers: dict[str, str] | None = None,
                 t0: float | None = None) -> None:
        self.url, self.body, self.timeout_s = url, body, timeout_s
        self.headers = {"content-type": "application/json", **(headers or {})}
        self.t0 = time.monotonic() if t0 is None else t0
        self.records: list[RequestRecord] = []
        self._clients = 0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._client, args=(i,), daemon=True,
                                          name=f"load-{i}") for i in range(max_clients)]

    def __enter__(self) -> RequestLoad:
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(timeout=self.timeout_s + 5)

    def set_clients(self, n: int) -> None:
        if not 0 <= n <= len(self._threads):
            raise ValueError(f"clients={n}: between 0 and max_clients={len(self._threads)}.")
        self._clients = n

    def _client(self, i: int) -> None:
        import httpx

        payload = json.dumps(self.body).encode()
        with httpx.Client(timeout=self.timeout_s) as client:
            while not self._stop.is_set():
                if i >= self._clients:
                    time.sleep(0.05)
                    continue
                start = time.monotonic()
                try:
                    r = client.post(self.url, content=payload, headers=self.headers)
                    rec = RequestRecord(round(start - self.t0, 3), time.monotonic() - start,
                                        r.status_code, None if r.status_code == 200 else r.text[:300])
                except httpx.HTTPError as e:
                    rec = RequestRecord(round(start - self.t0, 3), time.monotonic() - start, None,
                                        f"{type(e).__name__}: {e}"[:300])
                with self._lock:
                    self.records.append(rec)

    def failed(self) -> list[RequestRecord]:
        """Requests not answered 200 (an HTTP error status or no answer at all)."""
        with self._lock:
            return [r for r in self.records if r.status != 200]


@contextlib.contextmanager
def server_process(
    cmd: list[str], health_url: str, *, name: str, env: dict[str, str] | None = None,
    cwd: str | Path | None = None, log: Path | None = None, timeout_s: float = 300.0,
    stop_signal: int = signal.SIGTERM,
) -> Iterator[subprocess.Popen]:
    """Start a server process (its output to ``log``, else inherited), wait until ``health_url``
    answers 200, and stop it on exit (``stop_signal``; SIGINT lets ``l2vg serve`` shut Serve
    down), then kill it if it has not ended after 60 s."""
    import httpx

    out = log.open("w") if log is not None else None
    proc = subprocess.Popen(cmd, env=env, cwd=cwd, stdout=out,
                            stderr=subprocess.STDOUT if out else None, start_new_session=True)
    seen = f"; see {log}" if log is not None else ""
    try:
        deadline = time.monotonic() + timeout_s
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"{name} exited with code {proc.returncode}{seen}.")
            try:
                if httpx.get(health_url, timeout=5).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"{name} did not answer {health_url} within {timeout_s:.0f} s"
                                   f"{seen}.")
            time.sleep(0.5)
        yield proc
    finally:
        proc.send_signal(stop_signal)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)
        if out is not None:
            out.close()
