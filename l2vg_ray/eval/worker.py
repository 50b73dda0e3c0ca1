"""What one eval worker process holds: the job spec of a task (``TaskJob``) and its encoder.

``job_encoder(job)`` loads the job's encoder once per worker process (behind the embedding
cache) and hands the same object to every later task of that process that names the same
encoder: Ray reuses worker processes between tasks, so a worker loads its model once. Both
the per-task core (``runner.evaluate_task``) and the corpus shards (``shard.embed_shard``)
use it, so a shard's worker process also keeps the model for the tasks that follow.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from typing import Any

from l2vg_ray.config import L2VGConfig


@dataclass(frozen=True)
class TaskJob:
    """Everything one Ray task needs (plain, picklable)."""

    task: str
    model: str  # trained encoder folder or baseline name
    cfg: L2VGConfig  # the typed config (to build baselines / load the encoder)
    data_dir: str | None  # prepared offline data (offline tasks only)
    results_dir: str  # mteb ResultCache folder
    cache_dir: str | None  # embedding cache folder; None = no cache
    overwrite: bool
    batch_size: int
    max_docs: int
    seed: int
    num_threads: int
    instructions: str = "project"  # named instruction set (InstructionSet.named)
    max_length: int | None = None  # input tokens per text (eval.max_length); None = the model's


_ENCODERS: dict[str, Any] = {}
# Models loaded by this worker process so far: a row's model_loads is this counter's increase
# during its task (0 when the worker already held the model or the task was fully cached).
_LOADS = [0]


def _load(model: str, c: L2VGConfig, max_length: int | None):
    from l2vg_ray.loading import load_encoder

    _LOADS[0] += 1
    return load_encoder(model, c, max_length=max_length)


def job_encoder(job: TaskJob):
    """The (cached) encoder for this job, loaded once per worker process and reused."""
    from l2vg_ray.eval import baselines  # noqa: F401  (registers into BASELINES)
    from l2vg_ray.eval.cache import CachedEncoder, EmbeddingCache
    from l2vg_ray.loading import saved_encoder_folder

    c = job.cfg
    key = json.dumps([job.model, job.cache_dir, asdict(c.model), asdict(c.generate), c.cache_dir,
                      job.max_length], sort_keys=True, default=str)
    if key not in _ENCODERS:
        _ENCODERS.clear()  # one encoder per process: free the previous one's memory
        saved = saved_encoder_folder(job.model, c) if job.cache_dir else None
        if saved is not None:
            # A trained encoder's fingerprint comes from its small files: the LLM loads only
            # when the cache misses a text, so a fully cached task never loads it.
            from l2vg_ray.encoder.model import saved_encoder_info

            def load():  # the folder, already resolved from a packaged name
                return _load(str(saved), c, job.max_length)

            info = saved_encoder_info(saved, max_length=job.max_length)
            encoder = CachedEncoder.deferred(load, EmbeddingCache(job.cache_dir), name=info.name,
                                             dim=info.dim, fingerprint=info.fingerprint)
        else:
            encoder = _load(job.model, c, job.max_length)
            if job.cache_dir:
                encoder = CachedEncoder(encoder, EmbeddingCache(job.cache_dir))
        _ENCODERS[key] = encoder
    return _ENCODERS[key]


def loads_so_far() -> int:
    """Encoders this worker process has loaded (a task's ``model_loads`` is its increase)."""
    return _LOADS[0]


def release() -> None:
    """Drop the held encoder, as a fresh worker process starts (tests; freeing memory)."""
    _ENCODERS.clear()
