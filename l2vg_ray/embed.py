"""``l2vg embed``: a whole corpus -> embeddings on Ray Data, exactly once, resumable.

    l2vg embed --config configs/laptop.yaml embed.input=corpus.parquet \\
        embed.model=l2vg-smollm2-135m-laptop embed.num_actors=4

``run_embed(cfg)`` (Ray already initialised) reads top to bottom:

1. read the corpus (``embed.input``: Parquet, JSONL or .txt files, a file or a folder, local or a
   URI) into (id, text) rows; the id is ``embed.id_column`` or, without one, the text's hash;
2. resume: ids already in complete shards under ``embed.output_dir`` are skipped;
3. ONE Ray Data pipeline over the pending rows: ``EmbedStage``, an actor pool of encoders
   (``embed.num_actors`` x ``num_cpus_per_actor`` / ``num_gpus_per_actor``) loaded once each;
4. the driver writes a shard every ``rows_per_shard`` rows (temp file + rename, the generation
   stage's discipline), so a killed run leaves complete shards or nothing that counts;
5. ``manifest.json``: rows, dimension, model and fingerprint, texts/s, wall time.

Shards hold ``id``, ``embedding`` (float32[dim]) and, with ``embed.keep_text``, ``text``.
"""

from __future__ import annotations

import json
import logging
import math
import time
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
from omegaconf import DictConfig

from l2vg_ray import schema
from l2vg_ray.config import ConfigError, L2VGConfig, to_dict, typed
from l2vg_ray.dataset import OutputDir, ShardWriter, package_versions, read_done_ids
from l2vg_ray.ray_utils import ProgressLine

log = logging.getLogger(__name__)

TEXT = "text"
EMBEDDING = "embedding"
_SECONDS = "_l2vg_embed_s"
_FINGERPRINT = "_l2vg_fingerprint"
SUFFIXES = (".parquet", ".jsonl", ".ndjson", ".txt")


def embed_schema(dim: int, *, keep_text: bool) -> pa.Schema:
    fields = [pa.field(schema.ID, pa.string(), nullable=False)]
    if keep_text:
        fields.append(pa.field(TEXT, pa.string(), nullable=False))
    fields.append(pa.field(EMBEDDING, pa.list_(pa.float32(), dim), nullable=False))
    return pa.schema(fields)


def corpus_files(path: str) -> tuple[Any, list[str]]:
    """(pyarrow filesystem, the corpus files under ``path``), sorted; errors name the fix."""
    import pyarrow.fs as pafs

    from l2vg_ray.storage import filesystem

    fs, root = filesystem(path)
    info = fs.get_file_info(root)
    if info.type == pafs.FileType.NotFound:
        raise ConfigError(f"embed.input={path!r} does not exist. Point it at a file or folder.")
    if info.type == pafs.FileType.File:
        files = [root]
    else:
        files = sorted(f.path for f in fs.get_file_info(pafs.FileSelector(root, recursive=True))
                       if f.type == pafs.FileType.File and not f.base_name.startswith("."))
    files = [f for f in files if f.lower().endswith(SUFFIXES)]
    if not files:
        raise ConfigError(
            f"embed.input={path!r} holds no corpus file ({', '.join(SUFFIXES)}): give Parquet, "
            f"JSONL or text files (one text per line)."
        )
    return fs, files


def read_corpus(path: str, *, text_column: str, id_column: str | None) -> tuple[list[str], list[str]]:
    """(ids, texts) of every row of the corpus, in file order. Duplicate ids are an error."""
    import pyarrow.json as pajson
    import pyarrow.parquet as pq

    fs, files = corpus_files(path)
    ids: list[str] = []
    texts: list[str] = []
    for f in files:
        lower = f.lower()
        if lower.endswith(".txt"):
            with fs.open_input_stream(f) as stream:
                lines = stream.read().decode("utf-8").splitlines()
            table = pa.table({text_column: [line for line in lines if line.strip()]})
        elif lower.endswith(".parquet"):
            table = pq.read_table(f, filesystem=fs)
        else:
            with fs.open_input_stream(f) as stream:
                table = pajson.read_json(stream)
        if text_column not in table.column_names:
            raise ConfigError(
                f"{f}: no column {text_column!r} (it has {table.column_names}); set "
                f"embed.text_column."
            )
        col = [("" if t is None else str(t)) for t in table.column(text_column).to_pylist()]
        if id_column and id_column in table.column_names:
            row_ids = [str(i) for i in table.column(id_column).to_pylist()]
        else:
            row_ids = [schema.query_id(t) for t in col]
        ids.extend(row_ids)
        texts.extend(col)
    if len(set(ids)) != len(ids):
        seen: set[str] = set()
        dup = next(i for i in ids if i in seen or seen.add(i))
        raise ValueError(
            f"{path}: id {dup!r} appears more than once ({len(ids) - len(set(ids))} duplicates). "
            f"Ids must be unique: fix embed.id_column's values, or set embed.id_column=null to "
            f"use text hashes (identical texts are then embedded once)."
            if id_column else
            f"{path}: {len(ids) - len(set(ids))} texts appear more than once; deduplicate them."
        )
    return ids, texts


class EmbedStage:
    """``map_batches`` callable: (id, text) -> (id, [text], embedding). One encoder per actor."""

    def __init__(self, cfg: L2VGConfig) -> None:
        from l2vg_ray.loading import load_encoder
        from l2vg_ray.torch_utils import set_threads

        e = cfg.embed
        set_threads(e.num_cpus_per_actor)
        self.encoder = load_encoder(str(e.model), cfg)
        self.fingerprint = self.encoder.fingerprint()
        self.instruction = e.instruction or None
        self.normalize = bool(e.normalize)
        self.keep_text = bool(e.keep_text)
        self.batch_size = int(e.batch_size)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, Any]:
        start = time.perf_counter()
        texts = [str(t) for t in batch[TEXT]]
        emb = self.encoder.encode(texts, instruction=self.instruction, batch_size=self.batch_size,
                                  normalize=self.normalize)
        out: dict[str, Any] = {schema.ID: batch[schema.ID], EMBEDDING: np.asarray(emb, np.float32)}
        if self.keep_text:
            out[TEXT] = batch[TEXT]
        n = len(texts)
        out[_SECONDS] = np.full(n, (time.perf_counter() - start) / max(n, 1))
        out[_FINGERPRINT] = np.array([self.fingerprint] * n, dtype=object)
        return out


def _table(batch: dict[str, Any], keep_text: bool) -> pa.Table:
    emb = np.asarray(np.stack(list(batch[EMBEDDING])) if batch[EMBEDDING].dtype == object
                     else batch[EMBEDDING], dtype=np.float32)
    dim = emb.shape[1]
    arrays = [pa.array([str(i) for i in batch[schema.ID]], type=pa.string())]
    if keep_text:
        arrays.append(pa.array([str(t) for t in batch[TEXT]], type=pa.string()))
    arrays.append(pa.FixedSizeListArray.from_arrays(
        pa.array(np.ascontiguousarray(emb).reshape(-1), type=pa.float32()), dim))
    return pa.Table.from_arrays(arrays, schema=embed_schema(dim, keep_text=keep_text))


def run_embed(cfg: DictConfig) -> dict[str, Any]:
    """Embed ``embed.input`` into ``embed.output_dir`` (resumable, exactly once)."""
    import ray.data

    start = time.perf_counter()
    e = cfg.embed
    if not e.input:
        raise ConfigError("embed.input is not set: give the corpus, e.g. embed.input=docs.parquet.")
    for key in ("batch_size", "num_actors", "rows_per_shard"):
        if int(e[key]) < 1:
            raise ConfigError(f"embed.{key}={e[key]}; it must be >= 1.")
    ids, texts = read_corpus(str(e.input), text_column=str(e.text_column),
                             id_column=e.id_column or None)
    out = OutputDir.from_path(str(e.output_dir))
    out.fs.create_dir(out.root, recursive=True)
    out.remove_stale_temps()
    done, previous = read_done_ids(out)
    stale = done - set(ids)
    if stale:
        raise ConfigError(
            f"{out.uri} holds {len(stale)} embeddings of ids not in {e.input!r}: it belongs to "
            f"another corpus. Nothing was deleted; set embed.output_dir to a fresh folder."
        )
    settings = {"model": str(e.model), "instruction": e.instruction, "normalize": bool(e.normalize)}
    for prov in previous:
        old = {k: prov.get(k) for k in settings}
        if old != settings:
            raise ConfigError(
                f"{out.uri}/{prov.get('file')} was embedded with {old}, this run uses {settings}: "
                f"resuming would mix two encoders. Use a fresh embed.output_dir."
            )
    pending = [(i, t) for i, t in zip(ids, texts, strict=True) if i not in done]
    log.info("embed: %d texts, %d already in %s, %d to embed", len(ids), len(ids) - len(pending),
             out.uri, len(pending))
    rows, busy, fingerprint, dim = 0, 0.0, None, None
    t0 = time.perf_counter()
    if pending:
        ds = ray.data.from_items(
            [{schema.ID: i, TEXT: t} for i, t in pending],
            override_num_blocks=max(1, math.ceil(len(pending) / int(e.batch_size))),
        ).map_batches(
            EmbedStage, fn_constructor_kwargs={"cfg": typed(cfg)}, batch_format="numpy",
            batch_size=int(e.batch_size), compute=ray.data.ActorPoolStrategy(size=int(e.num_actors)),
            num_cpus=float(e.num_cpus_per_actor), num_gpus=float(e.num_gpus_per_actor),
        )
        provenance = {**settings, "run_id": uuid.uuid4().hex[:12]}
        writer = ShardWriter(out, int(e.rows_per_shard), provenance)
        progress = ProgressLine("embed", len(ids), unit="texts", done=len(ids) - len(pending))
        for batch in ds.iter_batches(batch_size=None, batch_format="numpy", prefetch_batches=1):
            if not len(batch[schema.ID]):
                continue
            progress.update(len(batch[schema.ID]))
            fingerprint = str(batch[_FINGERPRINT][0])
            provenance["fingerprint"] = fingerprint
            busy += float(np.asarray(batch[_SECONDS]).sum())
            table = _table(batch, bool(e.keep_text))
            dim = table.schema.field(EMBEDDING).type.list_size
            rows += table.num_rows
            writer.add(table)
        writer.close()
    pipeline_s = time.perf_counter() - t0
    done_after, shards = read_done_ids(out)
    missing = set(ids) - done_after
    if missing:
        raise RuntimeError(
            f"{len(missing)} of {len(ids)} texts have no embedding in {out.uri} after the run; "
            f"rerun `l2vg embed` to fill them in."
        )
    manifest = {
        "output_dir": out.uri,
        "input": str(e.input),
        "rows": sum(s["rows"] for s in shards),
        "rows_embedded": rows,
        "rows_skipped_existing": len(ids) - len(pending),
        "dim": dim or next((s.get("dim") for s in shards if s.get("dim")), None),
        "model": str(e.model),
        "fingerprint": fingerprint or next((s.get("fingerprint") for s in shards), None),
        "instruction": e.instruction,
        "normalize": bool(e.normalize),
        "shards": [{"file": s["file"], "rows": s["rows"]} for s in shards],
        "texts_per_s": round(rows / pipeline_s, 2) if rows and pipeline_s > 0 else None,
        "texts_per_s_per_actor": round(rows / busy, 2) if busy > 0 else None,
        "pipeline_s": round(pipeline_s, 3),
        "wall_s": round(time.perf_counter() - start, 3),
        "versions": package_versions(),
        "config": to_dict(cfg)["embed"],
    }
    out.write_atomic(schema.MANIFEST_FILE, lambda tmp: _write(out, tmp, manifest))
    print(f"embed: {manifest['rows']} embeddings in {out.uri} ({rows} new, "
          f"{manifest['rows_skipped_existing']} already there); {manifest['texts_per_s']} texts/s",
          flush=True)
    return manifest


def _write(out: OutputDir, path: str, manifest: dict) -> None:
    with out.fs.open_output_stream(path) as f:
        f.write(json.dumps(manifest, indent=2, default=str).encode("utf-8"))


def read_embeddings(path: str | Path) -> pa.Table:
    """Every shard of an embedding folder as one table (id, [text], embedding)."""
    import pyarrow.parquet as pq

    out = OutputDir.from_path(str(path))
    names = out.shards()
    if not names:
        raise FileNotFoundError(f"No embedding shards in {out.uri!r}; run `l2vg embed` first.")
    return pa.concat_tables([pq.read_table(out.join(n), filesystem=out.fs) for n in names])
