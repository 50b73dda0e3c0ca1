"""Run one Ray task per job with bounded concurrency; a job that raises is reported, not fatal.

``fan_out(fn, jobs, ...)`` submits ``fn(job)`` as Ray tasks with ``num_cpus`` / ``num_gpus`` and
any custom ``resources`` each (so that on a cluster, pending tasks are autoscaler demand for
those resources, e.g. ``{"eval_slot": 1}`` for the node type that offers it), keeps at most
``max_concurrency`` in flight (a ``ray.wait`` window; <= 0 = all at once), retries a task up to
``max_retries`` times on *system* failures (a worker or node dying) but never on an exception
raised by ``fn`` itself: that is a result, returned as a failed ``Outcome`` with its error while
the other jobs finish.

Why tasks and not actors: a task per job is exactly one unit of autoscaler demand and retry,
and Ray reuses worker processes between tasks of the same function, so the encoder memoised in
the worker process (``worker.job_encoder``) is loaded once per process, as an actor would hold it.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

log = logging.getLogger(__name__)


@dataclass
class Outcome:
    key: str
    ok: bool
    value: Any = None
    error: str | None = None
    seconds: float = 0.0


def _error_text(e: BaseException) -> str:
    import ray

    if isinstance(e, ray.exceptions.RayTaskError):
        cause = e.cause if getattr(e, "cause", None) is not None else e
        return f"{type(cause).__name__}: {cause}".strip()[:2000]
    return f"{type(e).__name__}: {e}"[:2000]


def task_options(
    fn: Callable[[Any], Any],
    *,
    num_cpus: float,
    num_gpus: float,
    max_retries: int,
    resources: dict[str, float] | None = None,
) -> dict[str, Any]:
    """The ``.options(...)`` of ``fan_out``'s Ray tasks (``resources`` only when non-empty)."""
    opts: dict[str, Any] = {
        "num_cpus": num_cpus,
        "num_gpus": num_gpus,
        "max_retries": max_retries,
        "retry_exceptions": False,  # an exception from fn is the task's answer, not a crash
        "name": f"eval:{getattr(fn, '__name__', 'job')}",
    }
    if resources:
        opts["resources"] = dict(resources)
    return opts


def fan_out(
    fn: Callable[[Any], Any],
    jobs: Sequence[Any],
    *,
    keys: Sequence[str],
    num_cpus: float = 1.0,
    num_gpus: float = 0.0,
    max_concurrency: int = 2,
    max_retries: int = 1,
    resources: dict[str, float] | None = None,
    on_done: Callable[[Outcome], None] | None = None,
) -> list[Outcome]:
    """``fn(job)`` for every job as a Ray task; outcomes in job order. Assumes Ray is initialised."""
    import ray

    if len(keys) != len(jobs):
        raise ValueError(f"fan_out: {len(keys)} keys for {len(jobs)} jobs.")
    if not ray.is_initialized():
        raise RuntimeError("fan_out needs Ray: call l2vg_ray.ray_utils.init_ray(cfg.cluster) first.")
    remote = ray.remote(fn).options(**task_options(
        fn, num_cpus=num_cpus, num_gpus=num_gpus, max_retries=max_retries, resources=resources))
    window = len(jobs) if max_concurrency <= 0 else max_concurrency
    pending = list(range(len(jobs)))
    in_flight: dict[Any, tuple[int, float]] = {}
    outcomes: list[Outcome | None] = [None] * len(jobs)
    while pending or in_flight:
        while pending and len(in_flight) < window:
            i = pending.pop(0)
            in_flight[remote.remote(jobs[i])] = (i, time.perf_counter())
        done, _ = ray.wait(list(in_flight), num_returns=1)
        for ref in done:
            i, t0 = in_flight.pop(ref)
            try:
                out = Outcome(keys[i], True, value=ray.get(ref))
            except Exception as e:  # the job failed: report it, keep going
                out = Outcome(keys[i], False, error=_error_text(e))
                log.warning("Job %s failed: %s", keys[i], out.error)
            out.seconds = time.perf_counter() - t0
            outcomes[i] = out
            if on_done is not None:
                on_done(out)
    return [o for o in outcomes if o is not None]
