"""What one eval worker process holds: the job spec of a task (``TaskJob``) and its encoder.

``job_encoder(job)`` loads the job's encoder once per worker process (behind the embedding
cache) and hands the same object to every later task of that process that names the same
encoder: Ray reuses worker processes between tasks, so a worker loads its model once. Both
the per-task core (``runner.evaluate_task``) and the corpus shards (``shard.embed_shard``)
use it, so a shard's worker process also keeps the model for the tasks that follow. With
encoder actors (``job.encoders``, ``eval.encoders`` > 0) it holds no model: a ``RemoteEncoder``
sends the cache misses to the actors (``service.py`` starts them).
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from l2vg_ray.config import EvalConfig, L2VGConfig
from l2vg_ray.text_encoders import text_list


@dataclass(frozen=True)
class TaskJob:
    """Everything one Ray task needs (plain, picklable): the typed config, which holds every eval
    setting once (read through the properties below), and what belongs to this task alone."""

    task: str
    cfg: L2VGConfig  # the typed config: eval settings, and what builds baselines / loads the encoder
    data_dir: str | None = None  # prepared offline data (offline tasks only)
    # Encoder actors (eval.encoders > 0, ``service.encoder_actors``): the task sends its cache
    # misses to them instead of loading the model itself. Empty = load it in this process.
    encoders: tuple[Any, ...] = ()

    @property
    def eval(self) -> EvalConfig:
        return self.cfg.eval

    @property
    def model(self) -> str:
        """The encoder: a trained encoder folder or a baseline name (eval.model)."""
        return self.cfg.eval.model

    @property
    def results_dir(self) -> str:
        """mteb's ResultCache folder: ``<eval.output_dir>/mteb``."""
        return str(Path(self.cfg.eval.output_dir) / "mteb")

    @property
    def cache_dir(self) -> str | None:
        """The embedding cache folder (eval.cache_dir); None = no cache."""
        return str(self.cfg.eval.cache_dir) if self.cfg.eval.cache_dir else None

    @property
    def encoding_resources(self) -> dict[str, Any]:
        """What a Ray worker that encodes asks for (a task without encoder actors, or an encoder
        actor): eval.num_cpus/gpus_per_task, and ``resources`` (eval.resources_per_task, when
        set) keeps it on the eval node type."""
        e = self.cfg.eval
        out: dict[str, Any] = {"num_cpus": float(e.num_cpus_per_task),
                               "num_gpus": float(e.num_gpus_per_task)}
        if e.resources_per_task:
            out["resources"] = {str(k): float(v) for k, v in e.resources_per_task.items()}
        return out

    @property
    def task_resources(self) -> dict[str, Any]:
        """``num_cpus`` / ``num_gpus`` (and ``resources``) of this job's Ray task and of its corpus
        shards: with encoder actors (eval.encoders > 0) it only scores (eval.scoring_cpus, no
        GPU, still on the eval node type), else it also encodes (``encoding_resources``)."""
        out = self.encoding_resources
        if self.cfg.eval.encoders > 0:
            out.update(num_cpus=float(self.cfg.eval.scoring_cpus), num_gpus=0.0)
        return out


_ENCODERS: dict[str, Any] = {}
# Models loaded by this worker process so far: a row's model_loads is this counter's increase
# during its task (0 when the worker already held the model or the task was fully cached).
_LOADS = [0]


def load_job_model(job: TaskJob):
    """The job's encoder, freshly loaded (no cache in front); counted in ``loads_so_far``."""
    from l2vg_ray.loading import load_encoder

    _LOADS[0] += 1
    return load_encoder(job.model, job.cfg, max_length=job.eval.max_length)


def saved_identity(job: TaskJob) -> tuple[str, int, str] | None:
    """(name, dim, fingerprint) of a trained encoder's folder, from its small files (the LLM is
    not loaded); None when the job's model is not a saved encoder (a baseline)."""
    from l2vg_ray.loading import saved_encoder_folder
    from l2vg_ray.method.model import saved_encoder_info

    saved = saved_encoder_folder(job.model, job.cfg)
    if saved is None:
        return None
    info = saved_encoder_info(saved, max_length=job.eval.max_length)
    return info.name, int(info.dim), info.fingerprint


def job_encoder(job: TaskJob):
    """The (cached) encoder for this job, loaded once per worker process and reused; with
    encoder actors (``job.encoders``), a cache in front of them and no model here."""
    from l2vg_ray.eval.cache import CachedEncoder, EmbeddingCache

    c = job.cfg
    key = json.dumps([job.model, job.cache_dir, asdict(c.model), asdict(c.generate), c.cache_dir,
                      c.eval.max_length, [str(a) for a in job.encoders]], sort_keys=True, default=str)
    if key not in _ENCODERS:
        _ENCODERS.clear()  # one encoder per process: free the previous one's memory
        # A trained encoder's identity comes from its small files, so the cache can be
        # consulted before any model loads (here or in an encoder actor).
        identity = saved_identity(job) if job.cache_dir else None
        if job.encoders:
            encoder = RemoteEncoder.connect(job.encoders, identity)
            if job.cache_dir:
                encoder = CachedEncoder(encoder, EmbeddingCache(job.cache_dir))
        elif identity is not None:
            # The LLM loads only when the cache misses a text: a fully cached task never loads it.
            name, dim, fingerprint = identity
            encoder = CachedEncoder.deferred(lambda: load_job_model(job), EmbeddingCache(job.cache_dir),
                                             name=name, dim=dim, fingerprint=fingerprint)
        else:
            encoder = load_job_model(job)
            if job.cache_dir:
                encoder = CachedEncoder(encoder, EmbeddingCache(job.cache_dir))
        _ENCODERS[key] = encoder
    return _ENCODERS[key]


class RemoteEncoder:
    """A ``TextEncoder`` whose encode calls run on encoder actors, in turn (round robin)."""

    loaded = False  # no model in this process (the results row's ``model_loaded``)

    def __init__(self, actors: Sequence[Any], identity: tuple[str, int, str]) -> None:
        if not actors:
            raise ValueError("RemoteEncoder needs at least one encoder actor.")
        self.actors = list(actors)
        self.name, self.dim, self._fingerprint = identity[0], int(identity[1]), identity[2]
        # Start at a different actor in each task process, so tasks spread over the actors.
        self._turn = itertools.cycle(np.random.default_rng().permutation(len(self.actors)))

    @classmethod
    def connect(cls, actors: Sequence[Any], identity: tuple[str, int, str] | None = None,
                ) -> RemoteEncoder:
        """Over ``actors``; without a known ``identity`` (a baseline), one actor is asked (it
        loads the model to answer)."""
        import ray

        return cls(actors, identity or tuple(ray.get(actors[0].identity.remote())))

    def encode(self, texts: Sequence[str], *, instruction: str | None = None, batch_size: int = 32,
               normalize: bool = False, show_progress: bool = False) -> np.ndarray:
        import ray

        texts = text_list(texts)
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        actor = self.actors[next(self._turn)]
        return ray.get(actor.encode.remote(texts, instruction, int(batch_size), bool(normalize)))

    def fingerprint(self) -> str:
        return self._fingerprint


def loads_so_far() -> int:
    """Encoders this worker process has loaded (a task's ``model_loads`` is its increase)."""
    return _LOADS[0]


def release() -> None:
    """Drop the held encoder, as a fresh worker process starts (tests; freeing memory)."""
    _ENCODERS.clear()
