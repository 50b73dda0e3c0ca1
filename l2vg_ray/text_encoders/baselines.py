"""Baseline encoders, registered into ``BASELINES`` when ``l2vg_ray.text_encoders`` is imported
(all are ``TextEncoder``s).

- ``mean-pool``: the frozen LLM (``cfg.model.llm``), last hidden states mean-pooled over the
  input tokens (LLM2Vec-style, no training). The instruction is part of the input but excluded
  from the pool, as in LLM2Vec.
- ``last-token``: the same LLM, the hidden state of the last input token.

``teacher`` (the configured teacher, whatever its kind) and ``generate-then-encode`` (the LLM
writes a response, the teacher embeds it) need the teachers and generation backends, so they live
with them in ``l2vg_ray.generate.baseline``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from l2vg_ray.text_encoders.base import (
    BASELINES,
    PooledLLMEncoder,
    TextEncoder,
)

if TYPE_CHECKING:
    from l2vg_ray.config import L2VGConfig


def _pooled(cfg: L2VGConfig, cache_dir: str | None, pooling: str) -> PooledLLMEncoder:
    return PooledLLMEncoder.load(
        str(cfg.model.llm),
        pooling=pooling,
        cache_dir=cache_dir,
        device=str(cfg.model.device),
        dtype=str(cfg.model.dtype),
        max_length=int(cfg.model.max_length),
    )


@BASELINES.register("mean-pool")
def build_mean_pool(cfg: L2VGConfig, cache_dir: str | None) -> TextEncoder:
    return _pooled(cfg, cache_dir, "mean")


@BASELINES.register("last-token")
def build_last_token(cfg: L2VGConfig, cache_dir: str | None) -> TextEncoder:
    return _pooled(cfg, cache_dir, "last")
