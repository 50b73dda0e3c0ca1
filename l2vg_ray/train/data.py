"""The training data: check the generated Parquet against the config and read it ONCE (driver
side, before any worker starts) into the held-out rows, the probe rows, the targets' moments and
the training rows; then stream deterministic micro-batches from a worker's shard.

Determinism: the driver orders the rows by id and cuts them into fixed blocks (so the files'
order and number do not matter), the Ray Data pipeline runs with ``preserve_order`` (so
``streaming_split`` hands each worker the same rows every time), each epoch is shuffled in a
local buffer seeded by (seed, epoch, rank), and a resumed worker skips the micro-batches it
already trained on. The same seed and rows therefore give the same batches whether or not the
run was interrupted and however the generate stage wrote its files.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa

from l2vg_ray import schema, storage
from l2vg_ray.config import ConfigError
from l2vg_ray.dataset import DatasetInfo
from l2vg_ray.train.batching import BatchPlan, micro_batches_per_epoch

if TYPE_CHECKING:
    from l2vg_ray.method.losses import TargetStats

# Columns the training loop reads; the rest of the generated schema stays on disk.
TRAIN_COLUMNS = (schema.QUERY, schema.RESPONSE, schema.TEACHER_EMBEDDING)
# Rows per block of the training Dataset (``id_blocks``): the laptop recipes' shard size
# (generate.rows_per_shard), so their data, written in id order, keeps the blocks it had when
# training read one block per file.
BLOCK_ROWS = 256


def check_data_against_config(
    info: DatasetInfo, *, teacher_dim: int | None, plan: BatchPlan
) -> int:
    """Cross-check the data and the config; return the teacher dim to train with."""
    if teacher_dim is not None and teacher_dim != info.teacher_dim:
        raise ConfigError(
            f"model.teacher_dim={teacher_dim} but the teacher embeddings in {info.path!r} have "
            f"{info.teacher_dim} dims. Set model.teacher_dim={info.teacher_dim} (or null to take "
            f"it from the data), or regenerate the data with the matching teacher."
        )
    if micro_batches_per_epoch(info.num_rows, plan) < 1:
        raise ConfigError(
            f"{info.path!r} holds {info.num_rows} rows: too few for one micro-batch of "
            f"{plan.micro_batch} rows on each of {plan.num_workers} workers. Lower "
            f"train.batch_size (now {plan.global_batch}) or generate more data."
        )
    return info.teacher_dim


@dataclass
class ValidationRows:
    """Rows as plain lists and a float32 matrix (the held-out rows, the probe rows)."""

    queries: list[str]
    responses: list[str]
    teacher: np.ndarray  # (rows, teacher_dim) float32

    def __len__(self) -> int:
        return len(self.queries)

    def head(self, n: int) -> ValidationRows:
        return ValidationRows(self.queries[:n], self.responses[:n], self.teacher[:n])

    @classmethod
    def from_table(cls, table: pa.Table) -> ValidationRows:
        """The rows of a table with the training columns (others are ignored)."""
        if table.num_rows == 0:
            dim = table.schema.field(schema.TEACHER_EMBEDDING).type.list_size
            return cls([], [], np.zeros((0, dim), dtype=np.float32))
        batch = {c: table.column(c).to_numpy(zero_copy_only=False) for c in TRAIN_COLUMNS}
        queries, responses, teacher = batch_lists(batch)
        return cls(queries, responses, teacher)

    def to_table(self) -> pa.Table:
        values = pa.array(self.teacher.reshape(-1), type=pa.float32())
        teacher = pa.FixedSizeListArray.from_arrays(values, self.teacher.shape[1])
        return pa.table({
            schema.QUERY: pa.array(self.queries, type=pa.string()),
            schema.RESPONSE: pa.array(self.responses, type=pa.string()),
            schema.TEACHER_EMBEDDING: teacher,
        })


def write_rows(rows: ValidationRows, path: str) -> str:
    """Write ``rows`` as one Parquet file at ``path`` (local or a URI) for the workers."""
    import pyarrow.parquet as pq

    sink = pa.BufferOutputStream()
    pq.write_table(rows.to_table(), sink)
    storage.write_bytes(path, sink.getvalue().to_pybytes())
    return path


def read_rows(path: str) -> ValidationRows:
    """The rows ``write_rows`` wrote at ``path``."""
    import pyarrow.parquet as pq

    return ValidationRows.from_table(pq.read_table(pa.BufferReader(storage.read_bytes(path))))


@dataclass
class TrainingData:
    """The generated dataset after ONE read on the driver, split into what training needs."""

    tables: list[pa.Table]  # the training rows (TRAIN_COLUMNS) by id, one table per id_blocks block
    heldout: ValidationRows  # the held-out rows, sorted by id
    probe: ValidationRows  # the first training rows by id (ridge probe, calibration)
    stats: TargetStats  # moments of the training rows' teacher embeddings

    @property
    def num_rows(self) -> int:
        """Training rows (held-out rows and rows left out by ``train.max_rows`` excluded)."""
        return sum(t.num_rows for t in self.tables)


def read_training_data(
    info: DatasetInfo, *, val_rows: int, max_rows: int | None, probe_rows: int, seed: int
) -> TrainingData:
    """Read the training columns of every shard once and derive the split from that table:
    ``val_rows`` held-out rows (``validation_ids``), at most ``max_rows`` training rows
    (``unused_ids``), the first ``probe_rows`` training rows and the targets' moments.

    Rows are ordered by id and cut into ``BLOCK_ROWS`` blocks before the split (``id_blocks``),
    so the batches depend on the rows alone: two generate runs that wrote the same rows in
    different files or orders (actors finish in any order) train identically.

    The driver holds the training columns in memory until ``train_dataset`` has put them in the
    object store (the previous path read the files five times instead).
    """
    import pyarrow.compute as pc
    import pyarrow.parquet as pq
    import torch

    from l2vg_ray.method.losses import TargetStats

    fs, _ = storage.filesystem(info.path)
    columns = [schema.ID, *TRAIN_COLUMNS]
    rows = pa.concat_tables(
        [pq.read_table(f, columns=columns, filesystem=fs) for f in info.files]
    ).sort_by(schema.ID)
    ids = rows.column(schema.ID).to_pylist()
    val_ids = validation_ids(ids, val_rows=val_rows, seed=seed)
    excluded = val_ids | unused_ids(ids, val_ids=val_ids, max_rows=max_rows, seed=seed)
    held, dropped = (pa.array(sorted(s), type=pa.string()) for s in (val_ids, excluded))
    heldout = rows.filter(pc.is_in(rows[schema.ID], value_set=held))
    tables = [
        block.filter(pc.invert(pc.is_in(block[schema.ID], value_set=dropped)))
        .drop_columns([schema.ID])
        for block in id_blocks(rows)
    ]
    n, total, total_sq = target_moments(tables)
    return TrainingData(
        tables=tables,
        heldout=ValidationRows.from_table(heldout),
        probe=ValidationRows.from_table(pa.concat_tables(tables).slice(0, max(0, probe_rows))),
        stats=TargetStats.from_moments(n, torch.from_numpy(total), torch.from_numpy(total_sq)),
    )


def id_blocks(rows: pa.Table, block_rows: int = BLOCK_ROWS) -> list[pa.Table]:
    """``rows`` (sorted by id) cut into consecutive blocks of ``block_rows`` rows.

    The blocks are fixed id ranges of the whole dataset, cut before held-out and ``max_rows``
    rows are removed, so removing rows never moves a block boundary. Boundaries matter: the
    workers' local shuffle buffer fills block by block.
    """
    return [rows.slice(start, block_rows) for start in range(0, rows.num_rows, block_rows)]


def train_dataset(tables: list[pa.Table]):
    """The Ray Dataset the workers split: ``tables`` (one block each, in order) put in the object
    store by the driver.

    Already materialised, with no read task to schedule: on a small node the workers hold every
    core and Ray Data excludes them from its budget, so a read scheduled later would wait forever.
    The blocks live in the object store (shared by a node's workers, spilled to disk when large);
    every epoch and every restart splits the same blocks in the same order.
    """
    import ray.data

    return ray.data.from_arrow(tables)


def _id_rank(row_id: str, seed: int) -> bytes:
    return hashlib.sha256(f"{seed}/{row_id}".encode()).digest()[:8]


def validation_ids(ids: Sequence[str], *, val_rows: int, seed: int) -> frozenset[str]:
    """The ``val_rows`` ids held out for validation: those with the smallest seeded hash, so the
    choice depends only on the ids and the seed (not on file order or the number of workers).

    At most a tenth of the data is held out: a small dataset keeps most of its rows for training.
    """
    if val_rows <= 0:
        return frozenset()
    n = min(val_rows, len(ids) // 10)
    return frozenset(sorted(ids, key=lambda i: _id_rank(i, seed))[:n])


def unused_ids(ids: Sequence[str], *, val_ids: frozenset[str], max_rows: int | None,
               seed: int) -> frozenset[str]:
    """Training rows left out by ``train.max_rows``: all but the first ``max_rows`` of the
    non-held-out ids in seeded hash order (empty when ``max_rows`` is None)."""
    if max_rows is None:
        return frozenset()
    if max_rows < 1:
        raise ConfigError(f"train.max_rows must be >= 1 or null, got {max_rows}.")
    rest = sorted((i for i in ids if i not in val_ids), key=lambda i: _id_rank(i, seed + 1))
    return frozenset(rest[max_rows:])


def target_moments(
    tables: Sequence[pa.Table], *, chunk_rows: int = 4096
) -> tuple[int, np.ndarray, np.ndarray]:
    """(rows, sum, sum of squares) of the teacher embeddings per dimension, in float64, over
    ``tables``; ``chunk_rows`` rows at a time so the float64 copy stays small."""
    dim = tables[0].schema.field(schema.TEACHER_EMBEDDING).type.list_size
    n, total, total_sq = 0, np.zeros(dim), np.zeros(dim)
    for table in tables:
        column = table.column(schema.TEACHER_EMBEDDING)
        for start in range(0, table.num_rows, chunk_rows):
            emb = column.slice(start, chunk_rows).combine_chunks()
            x = emb.flatten().to_numpy().reshape(len(emb), dim).astype(np.float64)
            n += len(x)
            total += x.sum(0)
            total_sq += (x * x).sum(0)
    return n, total, total_sq


def shuffle_seed(seed: int, epoch: int, rank: int) -> int:
    """A per-(seed, epoch, rank) seed, stable across processes and Python versions."""
    digest = hashlib.sha256(f"{seed}/{epoch}/{rank}".encode()).digest()
    return int.from_bytes(digest[:4], "little")


def micro_batch_stream(
    shard,
    *,
    micro_batch: int,
    seed: int,
    rank: int,
    shuffle_buffer: int,
    start: tuple[int, int] = (0, 0),
) -> Iterator[tuple[int, int, dict[str, np.ndarray]]]:
    """Yield ``(epoch, index, batch)`` forever from a ``DataIterator``, starting at ``start``.

    Batches before ``start`` = (epoch, index) are read but not yielded, so a resumed worker sees
    exactly the remaining batches of an uninterrupted run. ``shuffle_buffer`` = 0 keeps id order.
    """
    epoch, skip = start
    while True:
        shuffle = (
            {"local_shuffle_buffer_size": shuffle_buffer,
             "local_shuffle_seed": shuffle_seed(seed, epoch, rank)}
            if shuffle_buffer > 0
            else {}
        )
        n = 0
        for index, batch in enumerate(
            shard.iter_batches(
                batch_size=micro_batch, batch_format="numpy", drop_last=True, **shuffle
            )
        ):
            n += 1
            if index >= skip:
                yield epoch, index, batch
        if n == 0:
            raise ValueError(
                f"Worker {rank} got no full micro-batch of {micro_batch} rows in epoch {epoch}: "
                f"its data shard is too small. Lower train.batch_size or add data."
            )
        epoch, skip = epoch + 1, 0


def batch_lists(batch: dict[str, np.ndarray]) -> tuple[list[str], list[str], np.ndarray]:
    """Columns of a numpy micro-batch -> (queries, responses, teacher matrix float32)."""
    schema.require_columns(batch.keys(), TRAIN_COLUMNS, stage="train")
    teacher = np.stack([np.asarray(v, dtype=np.float32) for v in batch[schema.TEACHER_EMBEDDING]])
    return (
        [str(q) for q in batch[schema.QUERY]],
        [str(r) for r in batch[schema.RESPONSE]],
        teacher,
    )
