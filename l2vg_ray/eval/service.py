"""Encoder actors (``eval.encoders`` > 0): the model lives in a few actors, the tasks only score.

    run_eval -> encoder_actors(job, n)   n Ray actors, each with eval.num_cpus/gpus_per_task and
                                         eval.resources_per_task; each loads the model at its
                                         first text, keeps it
             -> fan_out(evaluate_task)   one Ray task per mteb task, eval.scoring_cpus each and
                                         no GPU: mteb runs here; its cache misses go to an actor

mteb's scoring (classifier fits over n_experiments, k-means, retrieval search) does not need the
model, so while one task fits its classifiers on CPU another task's texts keep the actors (the
GPUs) busy: scoring overlaps with encoding, and the model is loaded once per actor for the
whole suite. With ``eval.encoders: 0`` (the default) each task process holds its own encoder
instead (``worker.job_encoder``), which is the better shape where one device does both.

Scores equal the in-process path's: a task sends the same texts, in the same encode calls, to an
encoder that runs with the same thread count. A dead actor is restarted once by Ray and its call
retried; a call that still fails fails its task only (the fan-out reports it).

``EncoderServer`` is the actor's body (no Ray inside it); ``worker.RemoteEncoder`` the
``TextEncoder`` a task sees; ``encoder_actors`` the Ray part.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from l2vg_ray.eval.worker import TaskJob


class EncoderServer:
    """Holds one encoder (no cache: the calling task consults it), loaded at the first call."""

    def __init__(self, job: TaskJob) -> None:
        self.job = job
        self._encoder: Any = None

    def _loaded(self):
        if self._encoder is None:
            from l2vg_ray.eval.worker import load_job_model
            from l2vg_ray.torch_utils import set_threads

            set_threads(self.job.eval.num_cpus_per_task)  # the actor's num_cpus (encoder_actors)
            self._encoder = load_job_model(self.job)
        return self._encoder

    def identity(self) -> tuple[str, int, str]:
        """(name, dim, fingerprint) of the loaded encoder (a task asks only for a baseline: a
        trained encoder's it reads from the folder's small files itself)."""
        e = self._loaded()
        return e.name, int(e.dim), e.fingerprint()

    def encode(self, texts: list[str], instruction: str | None, batch_size: int,
               normalize: bool = False) -> np.ndarray:
        out = self._loaded().encode(texts, instruction=instruction, batch_size=batch_size,
                                    normalize=normalize)
        return np.asarray(out, dtype=np.float32)

    def load_count(self) -> int:
        """Models this actor's process has loaded (``worker.loads_so_far``)."""
        from l2vg_ray.eval.worker import loads_so_far

        return loads_so_far()


def actor_options(job: TaskJob) -> dict[str, Any]:
    """The ``.options(...)`` of an encoder actor: what a task that encodes would ask for
    (``TaskJob.encoding_resources``), restarted once."""
    return {**job.encoding_resources, "max_restarts": 1, "max_task_retries": 1}


@contextlib.contextmanager
def encoder_actors(job: TaskJob, n: int) -> Iterator[tuple[Any, ...]]:
    """``n`` encoder actors for ``job``'s model (none for ``n <= 0``), killed on exit; each holds
    eval.num_cpus_per_task CPUs and eval.num_gpus_per_task GPUs, as a task that encodes would."""
    import ray

    if n <= 0:
        yield ()
        return
    server = ray.remote(EncoderServer).options(**actor_options(job))
    actors = tuple(server.remote(job) for _ in range(n))
    try:
        yield actors
    finally:
        for a in actors:
            ray.kill(a)


def actor_loads(actors: Sequence[Any]) -> int:
    """Models the live actors have loaded (one each that encoded a text; a restarted actor
    counts from its restart)."""
    import ray

    if not actors:
        return 0
    return int(sum(ray.get([a.load_count.remote() for a in actors])))
