"""Connecting to Ray (only the CLI and the jobs call ``init_ray``; library code never calls
ray.init), and the drivers' one-line progress reports."""

from __future__ import annotations

import logging
import os
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager

log = logging.getLogger(__name__)


# Ray's own INFO lines that say nothing a user acts on (the stages log one progress line each and
# a summary), kept in Ray's log files: logger -> the lowest level that still reaches the console.
QUIET_LOGGERS = {
    # Train v2's placement-group cleaner polls the State API, which needs the dashboard that a
    # local cluster here runs without: "Failed to query Ray Train Controller actor state" every
    # few seconds for the whole run.
    "ray.train.v2._internal.execution.controller.placement_group_cleaner": logging.ERROR,
    # (Train's other INFO lines: RunConfig(logging_config=LoggingConfig("WARNING")), trainer.py)
    # "Dataset ... execution finished in N seconds", and the notice that progress bars are off
    # (we turned them off: quiet_ray_data_progress)
    "ray.data._internal.execution.streaming_executor": logging.WARNING,
    "ray.data._internal.progress": logging.ERROR,
}
# Progress bars of the libraries the stages call (transformers' "Loading weights", datasets'
# map, mteb's tqdm loops), printed once per actor and task: off unless the environment says.
QUIET_ENV = {
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",
    "HF_DATASETS_DISABLE_PROGRESS_BARS": "1",
    "TQDM_DISABLE": "1",
    # vLLM's start-up lines, some 40 per engine: INFO, and warnings about the CPU build's optional
    # accelerations (triton, tcmalloc) that a generation run does not act on
    "VLLM_LOGGING_LEVEL": "ERROR",
}
# Ray Train 2.60 starts a PreemptionWatcher actor per run (max_restarts=-1, the workers' handles
# as constructor arguments), which makes Ray Core log an error line for every training run
# ("constructor arguments in the object store and max_restarts > 0"). It reports preempted spot
# nodes to the workers; this project's runs resume from their checkpoints instead, so the watcher
# is off unless cluster.env_vars (or the environment) sets RAY_TRAIN_ENABLE_PREEMPTION_WATCHER=1.
TRAIN_ENV = {"RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0"}
# Ray Data actor pools (generation engines, teachers, embedders) get their stage as a reference
# in the object store and max_restarts=-1 by default, the same error line. A crashed actor is not
# restarted here: the stage fails, and a rerun resumes from its written shards (exactly once), so
# nothing is lost; an engine's restart would cost its whole start-up anyway.
ACTOR_POOL_ARGS = {"max_restarts": 0}


@contextmanager
def actor_pool_args_accepted() -> Iterator[None]:
    """Around ``map_batches(..., **ACTOR_POOL_ARGS)``: Ray 2.60 has no named parameter for
    ``max_restarts``, so it travels in ``ray_remote_args``, whose RayDeprecationWarning (removal
    announced for Ray 2.64) is expected here and filtered here only. Revisit on a Ray upgrade."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="`ray_remote_args` is deprecated")
        yield


def quiet_ray_logs() -> None:
    """Worker setup hook (and the driver's own call): ``QUIET_LOGGERS`` to their levels.

    Train v2 also logs every ``ray.train.report`` call at INFO ("Reporting training result N:
    ..." with the whole metrics dict) from a module that names its logger by its file path.
    """
    import ray

    for name, level in QUIET_LOGGERS.items():
        logging.getLogger(name).setLevel(level)
    context = os.path.join(
        os.path.dirname(ray.__file__), "train", "v2", "_internal", "execution", "context.py"
    )
    logging.getLogger(context).setLevel(logging.WARNING)


def quiet_ray_data_progress() -> None:
    """Ray Data's progress blocks (several lines per operator, every 10 s, when the output is
    not a terminal) off in this driver; the stages log their own ``ProgressLine`` instead."""
    from ray.data import DataContext

    ctx = DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.enable_operator_progress_bars = False
    ctx.print_on_execution_start = False


class ProgressLine:
    """One log line at most every ``every_s`` seconds: ``what: done/total (pct), rate, ETA``."""

    def __init__(
        self, what: str, total: int, *, unit: str = "rows", every_s: float = 30.0, done: int = 0
    ) -> None:
        self.what, self.total, self.unit, self.every_s = what, int(total), unit, float(every_s)
        self.start_done = self.done = int(done)
        self.started = self.last = time.monotonic()

    def update(self, n: int) -> None:
        self.done += int(n)
        now = time.monotonic()
        if now - self.last >= self.every_s and self.done < self.total:
            self.last = now
            log.info("%s", self.line(now))

    def line(self, now: float | None = None) -> str:
        elapsed = max(1e-9, (now or time.monotonic()) - self.started)
        rate = (self.done - self.start_done) / elapsed
        pct = 100.0 * self.done / self.total if self.total else 100.0
        eta = (self.total - self.done) / rate if rate > 0 else float("inf")
        eta_text = "?" if eta == float("inf") else f"{int(eta // 60)}m{int(eta % 60):02d}s"
        return (
            f"{self.what}: {self.done}/{self.total} {self.unit} ({pct:.0f}%), "
            f"{rate:.2f} {self.unit}/s, ETA {eta_text}"
        )


def init_ray(cluster_cfg, **kwargs) -> None:
    """Connect to ``cluster.address``, else RAY_ADDRESS (inside a Ray job), else start locally."""
    import ray

    quiet_ray_data_progress()
    if ray.is_initialized():
        return
    address = cluster_cfg.address or os.environ.get("RAY_ADDRESS")
    # Variables already in this process's environment are left out: inside a Ray job the job's
    # runtime_env set them (`l2vg submit` passes cluster.env_vars there), and ray.init rejects a
    # runtime_env that repeats a key of the job's.
    quiet = {k: v for k, v in QUIET_ENV.items() if k not in os.environ}
    wanted = {**quiet, **{str(k): str(v) for k, v in (cluster_cfg.env_vars or {}).items()}}
    env_vars = {k: v for k, v in wanted.items() if os.environ.get(k) != v}
    os.environ.update(quiet)  # the driver too
    for key, value in TRAIN_ENV.items():  # read by Ray Train's driver side, passed to its controller
        os.environ.setdefault(key, str((cluster_cfg.env_vars or {}).get(key, value)))
    runtime_env = {"env_vars": env_vars} if env_vars else None
    if address:
        log.info("Connecting to the Ray cluster at %s", address)
        ray.init(address=address, runtime_env=runtime_env, **kwargs)
    else:
        log.info("Starting a local Ray cluster in-process (num_cpus=%s)", cluster_cfg.num_cpus)
        runtime_env = {
            **(runtime_env or {}),
            "worker_process_setup_hook": f"{__name__}.quiet_ray_logs",
        }
        quiet_ray_logs()
        ray.init(
            address="local",
            num_cpus=cluster_cfg.num_cpus,
            include_dashboard=False,
            runtime_env=runtime_env,
            **kwargs,
        )
