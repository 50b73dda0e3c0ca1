"""The generation job: queries -> LLM responses -> teacher embeddings -> Parquet shards.

``run_generate(cfg)`` (Ray already initialised) reads top to bottom:

1. load and clean the queries (``queries.load_queries``), id = ``schema.query_id(query)``;
2. resume: ids already in complete shards under ``generate.output_dir`` are skipped;
3. ONE Ray Data pipeline over the pending rows (``stages.GenerateStage`` ->
   ``stages.TeacherStage``, actor pools that keep their engines across the whole run);
4. the driver iterates the results and writes a shard each time ``rows_per_shard`` rows have
   arrived (and the remainder at the end): a temp file renamed into place, so a killed run
   leaves either a complete shard (whose ids count as done) or nothing that counts;
5. ``manifest.json``: cleaning counts, rows, resolved config, versions, models, sampling
   params, the backend the actors used, tokens/s per stage, wall time; ``passes`` keeps what
   every pass over the folder did (a resumed pass with nothing to do keeps the first's timings).

Exactly once follows from (2) + (4): an id is either in one complete shard or regenerated.
``output_dir`` may be a local path or a URI (``s3://``, ``gs://``): files go through
``pyarrow.fs``; the shard format (writing, reading back, inspecting) is ``l2vg_ray.dataset``.
"""

from __future__ import annotations

import json
import logging
import math
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from omegaconf import DictConfig

from l2vg_ray import schema
from l2vg_ray.config import ConfigError, L2VGConfig, to_dict, typed
from l2vg_ray.dataset import (
    OutputDir,
    ShardWriter,
    batch_to_table,
    embedding_dim,
    package_versions,
    read_done_ids,
)
from l2vg_ray.ray_utils import ProgressLine, actor_pool_args_accepted

log = logging.getLogger(__name__)

# Hidden columns added by the timing wrappers and dropped before writing.
_GEN_SECONDS = "_l2vg_generate_s"
_TEACHER_SECONDS = "_l2vg_teacher_s"
_BACKEND = "_l2vg_backend"
# What each pass over the folder did (the manifest's ``passes``; the top level is the last pass).
PASS_FIELDS = ("written_at", "rows_generated", "rows_skipped_existing", "generated_tokens",
               "backend", "throughput", "wall_s")


# --------------------------------------------------------------------------------------------
# Timing wrappers: per-stage seconds and the backend the actors actually built


def _timed_stage(stage_cls: type, seconds_column: str, *, report_backend: bool = False) -> type:
    """A subclass of ``stage_cls`` that adds per-row busy seconds (and the backend name)."""

    class Timed(stage_cls):  # type: ignore[misc, valid-type]
        def __call__(self, batch):
            start = time.perf_counter()
            out = super().__call__(batch)
            n = len(next(iter(out.values()))) if out else 0
            out[seconds_column] = np.full(n, (time.perf_counter() - start) / max(n, 1))
            if report_backend:
                name = getattr(getattr(self, "backend", None), "name", "unknown")
                out[_BACKEND] = np.array([name] * n, dtype=object)
            return out

    # Ray Data names the operator after the class: keep the stage's own name in progress bars.
    Timed.__name__ = stage_cls.__name__
    Timed.__qualname__ = stage_cls.__qualname__
    return Timed


# --------------------------------------------------------------------------------------------
# The job


@dataclass
class _RunStats:
    rows: int = 0
    generated_tokens: int = 0
    generate_busy_s: float = 0.0
    teacher_busy_s: float = 0.0
    backends: set[str] = field(default_factory=set)
    teacher_models: set[str] = field(default_factory=set)
    shards: list[dict[str, Any]] = field(default_factory=list)

    def add(self, batch: dict[str, Any]) -> None:
        """Count a result batch: rows, tokens, per-stage busy seconds, backends, teachers."""
        self.rows += len(batch[schema.ID])
        self.generated_tokens += int(np.asarray(batch[schema.RESPONSE_TOKENS]).sum())
        self.generate_busy_s += float(np.asarray(batch[_GEN_SECONDS]).sum())
        self.teacher_busy_s += float(np.asarray(batch[_TEACHER_SECONDS]).sum())
        self.backends.update(str(b) for b in batch[_BACKEND])
        self.teacher_models.update(str(t) for t in batch[schema.TEACHER_MODEL])


def _check_resume_compatible(previous: list[dict[str, Any]], expected: dict[str, Any], uri: str) -> None:
    for prov in previous:
        for key, value in expected.items():
            if key in prov and prov[key] != value:
                raise ConfigError(
                    f"{uri}/{prov['file']} was generated with {key}={prov[key]!r}, but this run "
                    f"uses {value!r}. Resuming would mix two datasets: set generate.output_dir "
                    f"to a fresh folder (or delete the old one)."
                )


def _load_llm_tokenizer(cfg: DictConfig):
    from transformers import AutoTokenizer

    from l2vg_ray.models import resolve_model

    return AutoTokenizer.from_pretrained(resolve_model(str(cfg.model.llm), cache_dir=cfg.cache_dir))


def _stage_plan(cfg: DictConfig) -> list[tuple[type, dict[str, Any]]]:
    """(stage class, map_batches kwargs) of both stages, wrapped for timing."""
    from l2vg_ray.generate.stages import (
        GenerateStage,
        TeacherStage,
        generate_stage_kwargs,
        teacher_stage_kwargs,
    )

    plan = []
    for cls, kwargs, column, backend in (
        (GenerateStage, generate_stage_kwargs(cfg), _GEN_SECONDS, True),
        (TeacherStage, teacher_stage_kwargs(cfg), _TEACHER_SECONDS, False),
    ):
        kwargs = dict(kwargs)
        kwargs.setdefault("batch_format", "numpy")
        plan.append((_timed_stage(cls, column, report_backend=backend), kwargs))
    return plan


def build_dataset(cfg: DictConfig, ids: list[str], queries: list[str]):
    """The lazy Ray Data pipeline over pending rows: items -> GenerateStage -> TeacherStage."""
    import ray.data

    batch_size = int(cfg.generate.batch_size)
    ds = ray.data.from_items(
        [{schema.ID: i, schema.QUERY: q} for i, q in zip(ids, queries, strict=True)],
        override_num_blocks=max(1, math.ceil(len(ids) / batch_size)),
    )
    with actor_pool_args_accepted():
        for cls, kwargs in _stage_plan(cfg):
            ds = ds.map_batches(cls, **kwargs)
    return ds


def _iter_results(ds) -> Iterator[dict[str, Any]]:
    yield from ds.iter_batches(batch_size=None, batch_format="numpy", prefetch_batches=1)


@dataclass
class _Plan:
    """What this run generates: the pending (id, query) rows, the complete shards' provenance,
    and the generator settings every shard of the folder must share."""

    pending: list[tuple[str, str]]
    previous: list[dict[str, Any]]
    generator: dict[str, Any]


def _plan_run(cfg: DictConfig, out: OutputDir, ids: list[str], queries: list[str]) -> _Plan:
    """Resume: the rows not yet in a complete shard, after refusing a folder this run cannot
    continue (other generator settings, or rows whose queries left the query set)."""
    from l2vg_ray.generate.backends import GenerationSettings

    out.fs.create_dir(out.root, recursive=True)
    if stale := out.remove_stale_temps():
        log.info("Removed %d unfinished temp file(s) of an interrupted run in %s", stale, out.uri)
    done, previous = read_done_ids(out)
    generator = {
        "generator_model": str(cfg.model.llm),
        "sampling_params": GenerationSettings.from_config(cfg.generate).to_json(),
    }
    _check_resume_compatible(previous, generator, out.uri)
    pending = [(i, q) for i, q in zip(ids, queries, strict=True) if i not in done]
    stale_ids = len(done - set(ids))
    if stale_ids:
        raise ConfigError(
            f"{out.uri} holds {stale_ids} rows whose queries are not in this run's query set "
            f"(the set shrank or changed): training would still read them. Nothing was deleted. "
            f"Generate into a fresh generate.output_dir (name=NEW_NAME), or replace the old data "
            f"with `l2vg run --overwrite`."
        )
    log.info(
        "generate: %d queries, %d already in %d shard(s) of %s, %d to generate",
        len(ids), len(ids) - len(pending), len(previous), out.uri, len(pending),
    )
    return _Plan(pending, previous, generator)


def _generate_pending(
    cfg: DictConfig, out: OutputDir, plan: _Plan, n_queries: int
) -> tuple[_RunStats, float]:
    """Run the pipeline over ``plan.pending`` and write its shards; (stats, pipeline seconds)."""
    g = cfg.generate
    provenance = {
        **plan.generator,
        "run_id": uuid.uuid4().hex[:12],
        "backend_requested": str(g.backend),
        "l2vg_ray": package_versions().get("l2vg-ray", "unknown"),
    }
    writer = ShardWriter(out, int(g.rows_per_shard), provenance)
    ds = build_dataset(cfg, [i for i, _ in plan.pending], [q for _, q in plan.pending])
    t0 = time.perf_counter()
    run = _RunStats()
    dim: int | None = None
    progress = ProgressLine("generate", n_queries, done=n_queries - len(plan.pending))
    for batch in _iter_results(ds):
        if not len(batch[schema.ID]):
            continue
        progress.update(len(batch[schema.ID]))
        if dim is None:
            dim = embedding_dim(batch)
            teacher_model = str(batch[schema.TEACHER_MODEL][0])
            _check_resume_compatible(
                plan.previous, {"teacher_model": teacher_model, "teacher_dim": dim}, out.uri
            )
            provenance.update(teacher_model=teacher_model, teacher_dim=dim)
        run.add(batch)
        provenance["backend"] = ",".join(sorted(run.backends))
        writer.add(batch_to_table(batch, dim))
    writer.close()
    run.shards = writer.written
    return run, time.perf_counter() - t0


def run_generate(cfg: L2VGConfig) -> dict[str, Any]:
    """Generate the dataset of ``cfg`` into ``generate.output_dir`` (resumable, exactly once).

    Returns the manifest (also written to ``<output_dir>/manifest.json``).
    """
    cfg = typed(cfg)  # a DictConfig from load_config is accepted (checked there)
    from l2vg_ray.generate.queries import load_queries

    start = time.perf_counter()
    out = OutputDir.from_path(str(cfg.generate.output_dir))
    queries, query_stats = load_queries(cfg, tokenizer=_load_llm_tokenizer(cfg))
    ids = [schema.query_id(q) for q in queries]
    plan = _plan_run(cfg, out, ids, queries)

    run, pipeline_s = _RunStats(), 0.0
    if plan.pending:
        run, pipeline_s = _generate_pending(cfg, out, plan, len(ids))

    done_after, shards_after = read_done_ids(out)
    missing = set(ids) - done_after
    if missing:
        raise RuntimeError(
            f"{len(missing)} of {len(set(ids))} queries have no row in {out.uri} after the run "
            f"(e.g. {sorted(missing)[:3]}). Rerun `l2vg generate` to fill them in."
        )
    manifest = _manifest(
        cfg, out, query_stats, len(ids), len(ids) - len(plan.pending), run, pipeline_s,
        shards_after, time.perf_counter() - start,
    )
    manifest = out.write_manifest(manifest, PASS_FIELDS)
    print(_summary_line(manifest), flush=True)
    return manifest


def _rate(num: float, seconds: float) -> float | None:
    return round(num / seconds, 2) if seconds > 0 else None


def _manifest(
    cfg: DictConfig,
    out: OutputDir,
    query_stats: dict[str, int],
    n_queries: int,
    n_skipped: int,
    run: _RunStats,
    pipeline_s: float,
    shards: list[dict[str, Any]],
    wall_s: float,
) -> dict[str, Any]:
    first = next((s for s in shards if s.get("teacher_model")), {})
    g = cfg.generate
    return {
        "output_dir": out.uri,
        "rows": sum(s["rows"] for s in shards),
        "queries": n_queries,
        "query_stats": query_stats,
        "rows_skipped_existing": n_skipped,
        "rows_generated": run.rows,
        "shards": [{"file": s["file"], "rows": s["rows"]} for s in shards],
        "generator_model": str(cfg.model.llm),
        "teacher_model": first.get("teacher_model"),
        "teacher_dim": first.get("teacher_dim"),
        "sampling_params": json.loads(first.get("sampling_params") or "{}") or {
            "temperature": g.temperature, "top_p": g.top_p, "max_tokens": g.max_tokens,
            "seed": g.seed,
        },
        "backend_requested": str(g.backend),
        "backend": ",".join(sorted(run.backends)) or first.get("backend"),
        "generated_tokens": run.generated_tokens,
        "throughput": {
            # Busy seconds are summed over actors: tokens/s per actor while it was working.
            "generate_tokens_per_s_per_actor": _rate(run.generated_tokens, run.generate_busy_s),
            "teacher_tokens_per_s_per_actor": _rate(run.generated_tokens, run.teacher_busy_s),
            "pipeline_tokens_per_s": _rate(run.generated_tokens, pipeline_s),
            "pipeline_rows_per_s": _rate(run.rows, pipeline_s),
            "generate_busy_s": round(run.generate_busy_s, 3),
            "teacher_busy_s": round(run.teacher_busy_s, 3),
            "pipeline_s": round(pipeline_s, 3),
        },
        "wall_s": round(wall_s, 3),
        "versions": package_versions(),
        "config": to_dict(cfg),
    }


def _summary_line(m: dict[str, Any]) -> str:
    t = m["throughput"]
    return (
        f"generate: {m['rows']} rows in {m['output_dir']} ({m['rows_generated']} new, "
        f"{m['rows_skipped_existing']} already there); {m['generated_tokens']} generated tokens; "
        f"generate {t['generate_tokens_per_s_per_actor']} tok/s/actor, teacher "
        f"{t['teacher_tokens_per_s_per_actor']} tok/s/actor, pipeline "
        f"{t['pipeline_tokens_per_s']} tok/s; backend {m['backend']}; wall {m['wall_s']:.1f} s"
    )
