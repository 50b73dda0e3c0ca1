"""Training on Ray Train: data-parallel optimisation of the special tokens and the two heads.

- ``schedule``: learning-rate schedules (pure) and the optimiser factory.
- ``batching``: global batch = micro-batch x workers x accumulation, steps per epoch (pure).
- ``data``: checking the generated Parquet, reading it once into held-out, probe and training
  rows, the deterministic micro-batch stream.
- ``state``: checkpoint layout, RNG states.
- ``metrics``: the curves CSV and plot.
- ``validation``: held-out metrics and their references.
- ``loop``: ``train_loop_per_worker`` running ``L2VGTrainRecipe`` (``setup`` -> ``train`` ->
  ``cleanup``; one code path for 1 worker, N workers, N nodes).
- ``faults``: test-only fault injection (a worker that kills itself once).
- ``trainer``: ``run_train(cfg)`` - validate, prepare the workers' inputs, fit, export ``final/``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from l2vg_ray.config import L2VGConfig

__all__ = ["run_train"]


def run_train(cfg: L2VGConfig, *, resume: bool = False) -> dict:
    """See ``l2vg_ray.train.trainer.run_train`` (imported lazily: Ray and torch are heavy)."""
    from l2vg_ray.train.trainer import run_train as _run_train

    return _run_train(cfg, resume=resume)
