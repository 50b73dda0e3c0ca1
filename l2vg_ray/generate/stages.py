"""The generation job's Ray Data stages: callable classes for ``Dataset.map_batches``.

- ``GenerateStage(model, generate, cache_dir)``: QUERY (other columns pass through) ->
  RESPONSE, RESPONSE_TOKENS, GENERATOR_MODEL, SAMPLING_PARAMS, with one engine per actor
  (``backends.build_backend``);
- ``TeacherStage(spec)``: RESPONSE (other columns pass through) -> TEACHER_EMBEDDING (float32
  rows), TEACHER_MODEL, with one teacher per actor (``teacher.build_teacher``).

Each takes typed sections of the config (``config.typed`` on the driver, validated there once),
checks the columns it needs on every batch (``schema.require_columns``) and holds its model
across batches. ``generate_stage_kwargs(cfg)`` / ``teacher_stage_kwargs(cfg)`` are their
``map_batches`` arguments (actor pool, CPUs / GPUs / memory per actor, batch size, interpreter),
so that tests check the plan without Ray. What an actor is built from stays small (the typed
sections, a few KB): the rows travel as blocks, never in a constructor. The engines and the
teachers themselves live in ``backends.py`` and ``teacher.py``.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import numpy as np

from l2vg_ray import schema
from l2vg_ray.config import (
    GenerateConfig,
    L2VGConfig,
    ModelConfig,
    check_generate,
    check_teacher,
    typed,
)
from l2vg_ray.generate.backends import GenerationSettings, actor_python, build_backend
from l2vg_ray.generate.teacher import TeacherSpec, build_teacher
from l2vg_ray.ray_utils import ACTOR_POOL_ARGS
from l2vg_ray.torch_utils import set_threads

if TYPE_CHECKING:
    from omegaconf import DictConfig


def numpy_batch(batch: Any) -> dict[str, Any]:
    """A ``map_batches`` batch as {column: array} (a pandas batch is converted)."""
    if hasattr(batch, "to_dict") and hasattr(batch, "columns"):
        return {c: batch[c].to_numpy() for c in batch.columns}
    return batch


def column_to_list(batch: Mapping[str, Any], column: str) -> list:
    values = batch[column]
    return values.tolist() if hasattr(values, "tolist") else list(values)


def _check_type(stage: str, name: str, value: Any, expected: type, how: str) -> None:
    # A dict or DictConfig would run until some attribute is missing, deep in an actor: refuse
    # it at construction, naming what to pass.
    if not isinstance(value, expected):
        raise TypeError(
            f"{stage} takes {name}: {expected.__name__}, got {type(value).__name__}. "
            f"Pass {how} (or use the stage's *_stage_kwargs(cfg))."
        )


class GenerateStage:
    """``map_batches`` callable: QUERY -> RESPONSE, RESPONSE_TOKENS, GENERATOR_MODEL,
    SAMPLING_PARAMS (every input column, ID included, passes through). Holds one engine per
    actor across batches."""

    input_columns = (schema.QUERY,)

    def __init__(self, model: ModelConfig, generate: GenerateConfig, cache_dir: str) -> None:
        _check_type("GenerateStage", "model", model, ModelConfig, "typed(cfg).model")
        _check_type("GenerateStage", "generate", generate, GenerateConfig, "typed(cfg).generate")
        self.backend = build_backend(model, generate, cache_dir)
        if not self.backend.owns_threads:
            set_threads(generate.num_cpus_per_actor)
        self.generator_model = str(model.llm)
        self.sampling_params = GenerationSettings.from_config(generate).to_json()
        # Ray Data may run several calls at once (max_concurrent_batches); an engine that is
        # not built for it gets them one at a time.
        self._one_at_a_time = (contextlib.nullcontext() if self.backend.concurrent
                               else threading.Lock())

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        batch = numpy_batch(batch)
        schema.require_columns(batch.keys(), self.input_columns, stage="GenerateStage")
        queries = [str(q) for q in column_to_list(batch, schema.QUERY)]
        with self._one_at_a_time:
            outputs = self.backend.generate(queries)
        n = len(queries)
        out = dict(batch)
        out[schema.RESPONSE] = np.array([o.text for o in outputs], dtype=object)
        out[schema.RESPONSE_TOKENS] = np.array([o.n_tokens for o in outputs], dtype=np.int32)
        out[schema.GENERATOR_MODEL] = np.array([self.generator_model] * n, dtype=object)
        out[schema.SAMPLING_PARAMS] = np.array([self.sampling_params] * n, dtype=object)
        return out


class TeacherStage:
    """``map_batches`` callable: RESPONSE -> TEACHER_EMBEDDING (float32 rows), TEACHER_MODEL
    (every input column passes through). Holds one teacher per actor across batches."""

    input_columns = (schema.RESPONSE,)

    def __init__(self, spec: TeacherSpec) -> None:
        _check_type("TeacherStage", "spec", spec, TeacherSpec, "TeacherSpec.of(cfg)")
        set_threads(spec.teacher.num_cpus_per_actor)
        self.teacher = build_teacher(spec)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        batch = numpy_batch(batch)
        schema.require_columns(batch.keys(), self.input_columns, stage="TeacherStage")
        texts = [str(t) for t in column_to_list(batch, schema.RESPONSE)]
        emb = self.teacher.embed(texts)
        if emb.shape != (len(texts), self.teacher.dim) or emb.dtype != np.float32:
            raise ValueError(
                f"Teacher {self.teacher.name!r} returned {emb.dtype} {emb.shape}; expected "
                f"float32 ({len(texts)}, {self.teacher.dim}). Fix the teacher's embed()."
            )
        out = dict(batch)
        out[schema.TEACHER_EMBEDDING] = emb
        out[schema.TEACHER_MODEL] = np.array([self.teacher.name] * len(texts), dtype=object)
        return out


# Ray Data hands every pool actor its stage (class + fn_constructor_kwargs, ray.put once per
# operator) and its DataContext as object references, and gives the actors max_restarts=-1 by
# default. Ray Core then logs, once per driver process, "has constructor arguments in the object
# store and max_restarts > 0" (ray-project/ray#53727) for any actor pool, whatever the
# arguments' size. The pools here run with max_restarts=0 (ray_utils.ACTOR_POOL_ARGS): a crashed
# actor fails the stage and the rerun resumes from the written shards.


def generate_stage_kwargs(cfg: DictConfig | L2VGConfig) -> dict[str, Any]:
    """``Dataset.map_batches(GenerateStage, batch_format="numpy", **generate_stage_kwargs(cfg))``.

    An actor pool of ``generate.num_actors`` engines, each with ``num_cpus_per_actor`` CPUs and
    ``num_gpus_per_actor`` GPUs (a tensor-parallel vLLM engine needs one GPU per shard). The
    actors get the typed ``model`` and ``generate`` sections and the cache folder.
    """
    import ray.data

    c = typed(cfg)
    g = c.generate
    check_generate(g)  # a section built in code fails here, on the driver
    k = int(g.max_concurrent_batches)
    pool = {"max_tasks_in_flight_per_actor": k + 1, "max_concurrent_calls_per_actor": k,
            "enable_true_multi_threading": True} if k > 1 else {}
    kwargs: dict[str, Any] = {
        "fn_constructor_kwargs": {"model": c.model, "generate": g, "cache_dir": c.cache_dir},
        "compute": ray.data.ActorPoolStrategy(size=int(g.num_actors), **pool),
        "num_cpus": float(g.num_cpus_per_actor),
        "num_gpus": float(g.num_gpus_per_actor),
        "batch_size": int(g.batch_size),
        **ACTOR_POOL_ARGS,  # no restarts: see l2vg_ray.ray_utils
    }
    if g.memory_gb_per_actor is not None:
        kwargs["memory"] = int(g.memory_gb_per_actor * 2**30)
    python = actor_python(g.python)
    if python is not None:
        kwargs["runtime_env"] = {"py_executable": python}
    return kwargs


def teacher_stage_kwargs(cfg: TeacherSpec | DictConfig | L2VGConfig) -> dict[str, Any]:
    """``Dataset.map_batches(TeacherStage, batch_format="numpy", **teacher_stage_kwargs(cfg))``;
    an actor pool of ``teacher.num_actors`` teachers, which get a ``TeacherSpec``."""
    import ray.data

    spec = TeacherSpec.of(cfg)
    t = spec.teacher
    check_teacher(t)  # a section built in code fails here, on the driver
    return {
        "fn_constructor_kwargs": {"spec": spec},
        "compute": ray.data.ActorPoolStrategy(size=int(t.num_actors)),
        "num_cpus": float(t.num_cpus_per_actor),
        "num_gpus": float(t.num_gpus_per_actor),
        "batch_size": int(t.batch_size),
        **ACTOR_POOL_ARGS,  # no restarts: see l2vg_ray.ray_utils
    }
