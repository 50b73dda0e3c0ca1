"""``l2vg embed``: a whole corpus -> embeddings on Ray Data, exactly once, resumable.

    l2vg embed --config configs/laptop.yaml embed.input=corpus.parquet \\
        embed.model=l2vg-smollm2-135m-laptop embed.num_actors=4

``run_embed(cfg)`` (Ray already initialised) reads top to bottom:

1. read the corpus (``embed.input``: Parquet, JSONL or .txt files, a file or a folder, local or a
   URI) into (id, text) rows; the id is ``embed.id_column`` or, without one, the text's hash;
2. resume: rows already in complete shards under ``embed.output_dir`` *with the same text*
   (each stored row carries the SHA-256 of the text its vector was made from) are skipped; a
   folder holding other texts under the same ids, or ids no longer in the input, is refused
   unless ``embed.sync=true``, which re-embeds the changed texts and drops the others;
3. ONE Ray Data pipeline over the pending rows: ``EmbedStage``, an actor pool of encoders
   (``embed.num_actors`` x ``num_cpus_per_actor`` / ``num_gpus_per_actor``) loaded once each;
4. the driver writes a shard every ``rows_per_shard`` rows (temp file + rename, the generation
   stage's discipline), so a killed run leaves complete shards or nothing that counts;
5. ``manifest.json``: rows, dimension, model and fingerprint, texts/s, wall time, and
   ``passes``: what every pass over the folder did.

Shards hold ``id``, ``text_sha256``, ``embedding`` (float32[dim]) and, with ``embed.keep_text``,
``text``. The settings that change a vector or the schema (model, instruction, normalize,
keep_text) are the folder's identity: a run with others is refused.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
from omegaconf import DictConfig

from l2vg_ray import schema
from l2vg_ray.config import (
    ConfigError,
    EmbedConfig,
    GenerateConfig,
    InputError,
    L2VGConfig,
    ModelConfig,
    TeacherConfig,
    to_dict,
    typed,
)
from l2vg_ray.dataset import (
    OutputDir,
    ShardWriter,
    drop_rows,
    iter_shards,
    package_versions,
    read_done_ids,
)
from l2vg_ray.ray_utils import ACTOR_POOL_ARGS, ProgressLine, actor_pool_args_accepted

log = logging.getLogger(__name__)

TEXT = "text"
TEXT_HASH = "text_sha256"
EMBEDDING = "embedding"
_SECONDS = "_l2vg_embed_s"
_FINGERPRINT = "_l2vg_fingerprint"
_TRUNCATED = "_l2vg_truncated"
# What each pass over the folder did (the manifest's ``passes``; the top level is the last pass).
PASS_FIELDS = ("written_at", "rows_embedded", "rows_skipped_existing", "rows_reembedded_changed",
               "rows_dropped", "texts_per_s", "pipeline_s", "wall_s")
SUFFIXES = (".parquet", ".jsonl", ".ndjson", ".txt")


def embed_schema(dim: int, *, keep_text: bool) -> pa.Schema:
    fields = [pa.field(schema.ID, pa.string(), nullable=False),
              pa.field(TEXT_HASH, pa.string(), nullable=False)]
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


@dataclass
class Corpus:
    """The rows of ``embed.input`` to embed, and what was left out of them (counted)."""

    ids: list[str]
    texts: list[str]
    skipped_empty: int = 0  # rows without a text, skipped under embed.skip_empty
    merged_duplicates: int = 0  # identical texts under text-hash ids, embedded once


def _file_rows(fs: Any, f: str, text_column: str, id_column: str | None):
    """(where, id or None, text value) per row of one corpus file; ``where`` names file and row.

    JSONL is read line by line (no line-size limit, 1-based line numbers in errors); .txt is one
    text per line, blank lines are not rows; Parquet rows are numbered from 1.
    """
    import pyarrow.parquet as pq

    lower = f.lower()
    if lower.endswith(".parquet"):
        table = pq.read_table(f, filesystem=fs)
        if text_column not in table.column_names:
            raise InputError(f"{f}: no column {text_column!r} (it has {table.column_names}); set "
                             f"embed.text_column.")
        texts = table.column(text_column).to_pylist()
        row_ids = (table.column(id_column).to_pylist() if id_column and id_column in table.column_names
                   else [None] * len(texts))
        for n, (i, t) in enumerate(zip(row_ids, texts, strict=True), 1):
            yield f"{f} row {n}", i, t
        return
    with fs.open_input_stream(f) as stream:
        data = stream.read()
    for n, raw in enumerate(data.split(b"\n"), 1):
        where = f"{f} line {n}"
        try:
            line = raw.decode("utf-8").rstrip("\r")
        except UnicodeDecodeError as e:
            raise InputError(f"{where}: not UTF-8 text ({e.reason} at byte {e.start} of the "
                             f"line); save the file as UTF-8.") from None
        if not line.strip():
            continue
        if lower.endswith(".txt"):
            yield where, None, line
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise InputError(f"{where}: not valid JSON ({e.msg} at column {e.colno}); each line "
                             f"must be one JSON object.") from None
        if not isinstance(record, dict):
            raise InputError(f"{where}: a JSON {type(record).__name__}, not an object with a "
                             f"{text_column!r} field.")
        yield where, record.get(id_column) if id_column else None, record.get(text_column, _ABSENT)


_ABSENT = object()


def read_corpus(path: str, *, text_column: str, id_column: str | None,
                skip_empty: bool = False) -> Corpus:
    """Every row of the corpus, in file order, each one accounted for.

    A row without a text (field absent, null, empty or blank) is an error naming its file and row,
    or skipped and counted with ``skip_empty``; a text that is not a string, an id that is not a
    string or an integer, and a duplicate id are errors. Without ids (``id_column`` null or not in
    the data) a row's id is its text's hash, and identical texts are embedded once (counted).
    """
    fs, files = corpus_files(path)
    corpus = Corpus([], [])
    by_hash: set[str] = set()
    seen: dict[str, str] = {}
    id_rows = hash_rows = 0
    for f in files:
        for where, row_id, text in _file_rows(fs, f, text_column, id_column):
            if text is _ABSENT or text is None or (isinstance(text, str) and not text.strip()):
                if skip_empty:
                    corpus.skipped_empty += 1
                    continue
                what = ("has no " + repr(text_column) + " field" if text is _ABSENT
                        else f"has {text_column}={text!r}")
                raise InputError(f"{where} {what}: every row needs a text. Fix or remove the row, "
                                 f"or set embed.skip_empty=true to skip (and count) such rows.")
            if not isinstance(text, str):
                raise InputError(f"{where}: {text_column} is a {type(text).__name__} ({text!r}), "
                                 f"not a string.")
            if row_id is None:
                hash_rows += 1
                row_id = schema.query_id(text)
                if row_id in by_hash:
                    corpus.merged_duplicates += 1
                    continue
                by_hash.add(row_id)
            else:
                id_rows += 1
                if isinstance(row_id, bool) or not isinstance(row_id, (str, int)):
                    raise InputError(f"{where}: {id_column}={row_id!r} is a "
                                     f"{type(row_id).__name__}; ids must be strings or integers.")
                row_id = str(row_id)
                if row_id in seen:
                    raise InputError(
                        f"{where}: id {row_id!r} was already used at {seen[row_id]}. Ids must be "
                        f"unique: fix embed.id_column's values, or set embed.id_column=null to "
                        f"use text hashes (identical texts are then embedded once).")
                seen[row_id] = where
            corpus.ids.append(row_id)
            corpus.texts.append(text)
    if id_rows and hash_rows:
        raise InputError(f"{path}: {id_rows} rows have an {id_column!r} and {hash_rows} do not; "
                         f"give every row an id, or none (embed.id_column=null).")
    if not corpus.ids:
        raise InputError(f"embed.input={path!r} holds no texts"
                         + (f" ({corpus.skipped_empty} rows without one were skipped)"
                            if corpus.skipped_empty else "") + ".")
    return corpus


@dataclass(frozen=True)
class EmbedSpec:
    """What an embedding actor is built from (typed sections; it travels to the actors): the
    ``embed`` section, and the sections ``load_encoder`` reads to build a baseline encoder
    (``model``, ``generate``, ``teacher``, ``cache_dir``; a trained or published encoder carries
    its own configuration)."""

    embed: EmbedConfig
    model: ModelConfig
    generate: GenerateConfig
    teacher: TeacherConfig
    cache_dir: str

    @classmethod
    def of(cls, cfg: EmbedSpec | DictConfig | L2VGConfig) -> EmbedSpec:
        if isinstance(cfg, EmbedSpec):
            return cfg
        c = typed(cfg)
        return cls(embed=c.embed, model=c.model, generate=c.generate, teacher=c.teacher,
                   cache_dir=c.cache_dir)

    def encoder_config(self) -> L2VGConfig:
        """The config ``load_encoder`` takes: these sections, the others at their defaults (no
        encoder builder reads them)."""
        return L2VGConfig(model=self.model, generate=self.generate, teacher=self.teacher,
                          cache_dir=self.cache_dir)


class EmbedStage:
    """``map_batches`` callable: (id, text, text_sha256) -> (id, text_sha256, [text], embedding)
    and the hidden timing / fingerprint / truncation columns. One encoder per actor."""

    input_columns = (schema.ID, TEXT, TEXT_HASH)

    def __init__(self, spec: EmbedSpec) -> None:
        from l2vg_ray.loading import load_encoder
        from l2vg_ray.torch_utils import set_threads

        if not isinstance(spec, EmbedSpec):
            raise TypeError(f"EmbedStage takes spec: EmbedSpec, got {type(spec).__name__}. Pass "
                            f"EmbedSpec.of(cfg) (or use embed_stage_kwargs(cfg)).")
        e = spec.embed
        set_threads(e.num_cpus_per_actor)
        self.encoder = load_encoder(str(e.model), spec.encoder_config())
        self.fingerprint = self.encoder.fingerprint()
        self.instruction = e.instruction or None
        self.normalize = bool(e.normalize)
        self.keep_text = bool(e.keep_text)
        self.batch_size = int(e.batch_size)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, Any]:
        schema.require_columns(batch.keys(), self.input_columns, stage="EmbedStage")
        start = time.perf_counter()
        texts = [str(t) for t in batch[TEXT]]
        emb = self.encoder.encode(texts, instruction=self.instruction, batch_size=self.batch_size,
                                  normalize=self.normalize)
        # The driver hashed each text when it planned the run; the hash travels with its row.
        out: dict[str, Any] = {schema.ID: batch[schema.ID], EMBEDDING: np.asarray(emb, np.float32),
                               TEXT_HASH: batch[TEXT_HASH]}
        if self.keep_text:
            out[TEXT] = batch[TEXT]
        n = len(texts)
        out[_SECONDS] = np.full(n, (time.perf_counter() - start) / max(n, 1))
        out[_FINGERPRINT] = np.array([self.fingerprint] * n, dtype=object)
        limit = int(self.encoder.max_input_tokens)
        counts = self.encoder.count_tokens(texts, instruction=self.instruction)
        out[_TRUNCATED] = np.array([c > limit for c in counts], dtype=bool)
        return out


def embed_stage_kwargs(cfg: EmbedSpec | DictConfig | L2VGConfig) -> dict[str, Any]:
    """``Dataset.map_batches(EmbedStage, batch_format="numpy", **embed_stage_kwargs(cfg))``: an
    actor pool of ``embed.num_actors`` encoders, which get an ``EmbedSpec``."""
    import ray.data

    spec = EmbedSpec.of(cfg)
    e = spec.embed
    return {
        "fn_constructor_kwargs": {"spec": spec},
        "compute": ray.data.ActorPoolStrategy(size=int(e.num_actors)),
        "num_cpus": float(e.num_cpus_per_actor),
        "num_gpus": float(e.num_gpus_per_actor),
        "batch_size": int(e.batch_size),
        **ACTOR_POOL_ARGS,  # no restarts: see l2vg_ray.ray_utils
    }


def text_hash(text: str) -> str:
    """SHA-256 of the exact text a vector was made from (before any instruction)."""
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


@dataclass(frozen=True)
class StoredRows:
    """What an output folder holds: each id's text hash (None: a shard written before hashes
    were stored) and each shard's provenance, with ``keep_text`` read from its schema."""

    hashes: dict[str, str | None]
    provenance: list[dict[str, Any]]


def read_stored(out: OutputDir) -> StoredRows:
    hashes: dict[str, str | None] = {}
    provenance = []
    for prov, names, table in iter_shards(out, [schema.ID, TEXT_HASH]):
        row_hashes = (table.column(TEXT_HASH).to_pylist() if TEXT_HASH in names
                      else [None] * table.num_rows)
        hashes.update(zip(table.column(schema.ID).to_pylist(), row_hashes, strict=True))
        provenance.append({**prov, "keep_text": TEXT in names})
    return StoredRows(hashes, provenance)


@dataclass(frozen=True)
class ResumePlan:
    pending: list[int]  # input rows to embed (indices)
    changed: list[str]  # stored ids whose vector was made from another text (or an unknown one)
    removed: list[str]  # stored ids that are not in the input


def plan_resume(ids: list[str], hashes: list[str], stored: dict[str, str | None]) -> ResumePlan:
    """Which input rows a rerun embeds, given what the folder holds (pure)."""
    changed = [i for i, h in zip(ids, hashes, strict=True) if i in stored and stored[i] != h]
    changed_set = set(changed)
    pending = [k for k, i in enumerate(ids) if i not in stored or i in changed_set]
    removed = sorted(set(stored) - set(ids))
    return ResumePlan(pending, changed, removed)


def _stale_error(out: OutputDir, source: str, plan: ResumePlan, stored: StoredRows) -> ConfigError:
    unknown = sum(1 for i in plan.changed if stored.hashes[i] is None)
    parts = []
    if plan.changed:
        parts.append(f"{len(plan.changed)} of its ids hold the vector of another text than "
                     f"{source!r} gives them (e.g. {plan.changed[0]!r})"
                     + (f"; {unknown} come from shards written before text hashes were stored, "
                        "so their texts cannot be checked" if unknown else ""))
    if plan.removed:
        parts.append(f"{len(plan.removed)} of its ids are not in {source!r} (e.g. "
                     f"{plan.removed[0]!r})")
    return ConfigError(
        f"{out.uri} does not match the input: " + "; ".join(parts) + ". It was made from another "
        "corpus or an earlier version of this one. Nothing was changed. Write to a new folder "
        "(embed.output_dir=...), or set embed.sync=true to re-embed the changed texts and drop "
        "the rows no longer in the input."
    )


def _table(batch: dict[str, Any], keep_text: bool) -> pa.Table:
    emb = np.asarray(np.stack(list(batch[EMBEDDING])) if batch[EMBEDDING].dtype == object
                     else batch[EMBEDDING], dtype=np.float32)
    dim = emb.shape[1]
    arrays = [pa.array([str(i) for i in batch[schema.ID]], type=pa.string()),
              pa.array([str(h) for h in batch[TEXT_HASH]], type=pa.string())]
    if keep_text:
        arrays.append(pa.array([str(t) for t in batch[TEXT]], type=pa.string()))
    arrays.append(pa.FixedSizeListArray.from_arrays(
        pa.array(np.ascontiguousarray(emb).reshape(-1), type=pa.float32()), dim))
    return pa.Table.from_arrays(arrays, schema=embed_schema(dim, keep_text=keep_text))


def _folder_settings(e: Any) -> dict[str, Any]:
    """The settings that change a vector or the shard layout: a folder's identity."""
    return {"model": str(e.model), "instruction": e.instruction, "normalize": bool(e.normalize),
            "keep_text": bool(e.keep_text)}


def _check_same_settings(out: OutputDir, stored: StoredRows, settings: dict[str, Any]) -> None:
    for prov in stored.provenance:
        old = {k: prov.get(k) for k in settings}
        if old != settings:
            raise ConfigError(
                f"{out.uri}/{prov.get('file')} was embedded with {old}, this run uses {settings}: "
                f"resuming would mix two encoders or two shard layouts. Use a fresh "
                f"embed.output_dir."
            )


def _sync(out: OutputDir, e: Any, plan: ResumePlan, stored: StoredRows) -> int:
    """Refuse a folder that holds other texts or other ids, or (``embed.sync``) drop those rows
    so that they are re-embedded or gone; the number of rows dropped."""
    if not (plan.changed or plan.removed):
        return 0
    if not bool(e.sync):
        raise _stale_error(out, str(e.input), plan, stored)
    dropped = drop_rows(out, set(plan.changed) | set(plan.removed))
    log.info("embed: dropped %d rows from %s (%d changed texts to re-embed, %d ids no longer "
             "in the input)", dropped, out.uri, len(plan.changed), len(plan.removed))
    return dropped


@dataclass
class _EmbedRun:
    """What the pipeline produced this run (counted by the driver as it wrote the shards)."""

    rows: int = 0
    busy_s: float = 0.0  # summed over actors
    fingerprint: str | None = None
    dim: int | None = None
    truncated: int = 0


def _embed_pending(cfg: DictConfig, out: OutputDir, corpus: Corpus, hashes: list[str],
                   pending: list[int], settings: dict[str, Any]) -> _EmbedRun:
    """One Ray Data pipeline over the pending rows; shards written as results arrive."""
    import ray.data

    e = cfg.embed
    ids, texts = corpus.ids, corpus.texts
    ds = ray.data.from_items(
        [{schema.ID: ids[k], TEXT: texts[k], TEXT_HASH: hashes[k]} for k in pending],
        override_num_blocks=max(1, math.ceil(len(pending) / int(e.batch_size))),
    )
    with actor_pool_args_accepted():
        ds = ds.map_batches(EmbedStage, batch_format="numpy", **embed_stage_kwargs(cfg))
    provenance = {**settings, "run_id": uuid.uuid4().hex[:12]}
    writer = ShardWriter(out, int(e.rows_per_shard), provenance)
    progress = ProgressLine("embed", len(ids), unit="texts", done=len(ids) - len(pending))
    run = _EmbedRun()
    for batch in ds.iter_batches(batch_size=None, batch_format="numpy", prefetch_batches=1):
        if not len(batch[schema.ID]):
            continue
        progress.update(len(batch[schema.ID]))
        run.fingerprint = str(batch[_FINGERPRINT][0])
        provenance["fingerprint"] = run.fingerprint
        run.busy_s += float(np.asarray(batch[_SECONDS]).sum())
        run.truncated += int(np.asarray(batch[_TRUNCATED]).sum())
        table = _table(batch, bool(e.keep_text))
        run.dim = table.schema.field(EMBEDDING).type.list_size
        run.rows += table.num_rows
        writer.add(table)
    writer.close()
    return run


def run_embed(cfg: L2VGConfig) -> dict[str, Any]:
    """Embed ``embed.input`` into ``embed.output_dir`` (resumable, exactly once)."""
    cfg = typed(cfg)  # a DictConfig from load_config is accepted (checked there)
    start = time.perf_counter()
    e = cfg.embed
    if not e.input:
        raise ConfigError("embed.input is not set: give the corpus, e.g. embed.input=docs.parquet.")
    corpus = read_corpus(str(e.input), text_column=str(e.text_column),
                         id_column=e.id_column or None, skip_empty=bool(e.skip_empty))
    ids = corpus.ids
    out = OutputDir.from_path(str(e.output_dir))
    out.fs.create_dir(out.root, recursive=True)
    out.remove_stale_temps()
    stored = read_stored(out)
    settings = _folder_settings(e)
    _check_same_settings(out, stored, settings)
    hashes = [text_hash(t) for t in corpus.texts]
    plan = plan_resume(ids, hashes, stored.hashes)
    dropped = _sync(out, e, plan, stored)
    pending = plan.pending
    log.info("embed: %d texts, %d already in %s, %d to embed", len(ids), len(ids) - len(pending),
             out.uri, len(pending))
    t0 = time.perf_counter()
    run = _embed_pending(cfg, out, corpus, hashes, pending, settings) if pending else _EmbedRun()
    pipeline_s = time.perf_counter() - t0
    done_after, shards = read_done_ids(out)
    missing = set(ids) - set(done_after)
    if missing:
        raise RuntimeError(
            f"{len(missing)} of {len(ids)} texts have no embedding in {out.uri} after the run; "
            f"rerun `l2vg embed` to fill them in."
        )
    manifest = _embed_manifest(cfg, out, corpus, plan, dropped, run, shards, pipeline_s,
                               time.perf_counter() - start)
    manifest = out.write_manifest(manifest, PASS_FIELDS)
    speed = f"; {manifest['texts_per_s']} texts/s" if manifest["texts_per_s"] else ""
    cut = (f"; {run.truncated} texts were longer than the model reads and were cut"
           if run.truncated else "")
    print(f"embed: {manifest['rows']} embeddings in {out.uri} ({run.rows} new, "
          f"{manifest['rows_skipped_existing']} already there){speed}{cut}", flush=True)
    return manifest


def _embed_manifest(cfg: DictConfig, out: OutputDir, corpus: Corpus, plan: ResumePlan,
                    dropped: int, run: _EmbedRun, shards: list[dict[str, Any]], pipeline_s: float,
                    wall_s: float) -> dict[str, Any]:
    e = cfg.embed
    n = len(corpus.ids)
    return {
        "output_dir": out.uri,
        "input": str(e.input),
        "rows": sum(s["rows"] for s in shards),
        "rows_embedded": run.rows,
        "rows_skipped_existing": n - len(plan.pending),
        "rows_reembedded_changed": len(plan.changed),
        "rows_dropped": dropped,
        "rows_truncated": run.truncated,
        "rows_skipped_empty": corpus.skipped_empty,
        "rows_merged_duplicate_texts": corpus.merged_duplicates,
        "dim": run.dim or next((s.get("dim") for s in shards if s.get("dim")), None),
        "model": str(e.model),
        "fingerprint": run.fingerprint or next((s.get("fingerprint") for s in shards), None),
        "instruction": e.instruction,
        "normalize": bool(e.normalize),
        "keep_text": bool(e.keep_text),
        "shards": [{"file": s["file"], "rows": s["rows"]} for s in shards],
        "texts_per_s": round(run.rows / pipeline_s, 2) if run.rows and pipeline_s > 0 else None,
        "texts_per_s_per_actor": round(run.rows / run.busy_s, 2) if run.busy_s > 0 else None,
        "pipeline_s": round(pipeline_s, 3),
        "wall_s": round(wall_s, 3),
        "versions": package_versions(),
        "config": to_dict(cfg)["embed"],
    }


def read_embeddings(path: str | Path) -> pa.Table:
    """Every shard of an embedding folder as one table (id, [text], embedding)."""
    import pyarrow.parquet as pq

    out = OutputDir.from_path(str(path))
    names = out.shards()
    if not names:
        raise FileNotFoundError(f"No embedding shards in {out.uri!r}; run `l2vg embed` first.")
    return pa.concat_tables([pq.read_table(out.join(n), filesystem=out.fs) for n in names])
