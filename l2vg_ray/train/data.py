"""The training data: inspect and validate the generated Parquet (driver side, before any worker
starts) and stream deterministic micro-batches from a worker's shard.

Determinism: the Ray Data pipeline runs with ``preserve_order`` (so ``streaming_split`` hands each
worker the same rows every time), each epoch is shuffled in a local buffer seeded by
(seed, epoch, rank), and a resumed worker skips the micro-batches it already trained on. The same
seed therefore gives the same batches whether or not the run was interrupted.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from l2vg_ray import schema, storage
from l2vg_ray.config import ConfigError
from l2vg_ray.dataset import DatasetInfo
from l2vg_ray.train.batching import BatchPlan, micro_batches_per_epoch

# Columns the training loop reads; the rest of the generated schema stays on disk.
TRAIN_COLUMNS = (schema.QUERY, schema.RESPONSE, schema.TEACHER_EMBEDDING)


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


def read_train_dataset(info: DatasetInfo, *, exclude_ids: frozenset[str] = frozenset()):
    """The Ray Dataset of the training columns, files in a fixed order, without ``exclude_ids``
    (the held-out validation rows)."""
    import ray.data

    fs, _ = storage.filesystem(info.path)
    # Materialised in the driver, before the workers claim their CPUs: on a small node the
    # workers hold every core and Ray Data excludes them from its budget, so a read task
    # scheduled later would wait forever. Only the three training columns are kept (in the
    # object store, shared by the workers of a node, spilled to disk when large); every epoch
    # and every restart then splits the same blocks in the same order.
    ds = ray.data.read_parquet(
        list(info.files), columns=[schema.ID, *TRAIN_COLUMNS], filesystem=fs
    )
    ds = ds.map_batches(_DropRows(exclude_ids), batch_format="pyarrow")
    return ds.materialize()


class _DropRows:
    """``map_batches`` callable: drop the rows whose id is in ``ids``, then the id column."""

    def __init__(self, ids: frozenset[str]) -> None:
        self.ids = pa.array(sorted(ids), type=pa.string())

    def __call__(self, table: pa.Table) -> pa.Table:
        import pyarrow.compute as pc

        if len(self.ids):
            table = table.filter(pc.invert(pc.is_in(table[schema.ID], value_set=self.ids)))
        return table.drop_columns([schema.ID])


def _id_rank(row_id: str, seed: int) -> bytes:
    return hashlib.sha256(f"{seed}/{row_id}".encode()).digest()[:8]


def _all_ids(info: DatasetInfo) -> list[str]:
    import pyarrow.parquet as pq

    fs, _ = storage.filesystem(info.path)
    ids: list[str] = []
    for f in info.files:
        ids.extend(pq.read_table(f, columns=[schema.ID], filesystem=fs).column(0).to_pylist())
    return ids


def unused_ids(info: DatasetInfo, *, val_ids: frozenset[str], max_rows: int | None,
               seed: int) -> frozenset[str]:
    """Training rows left out by ``train.max_rows``: all but the first ``max_rows`` of the
    non-held-out ids in seeded hash order (empty when ``max_rows`` is None)."""
    if max_rows is None:
        return frozenset()
    if max_rows < 1:
        raise ConfigError(f"train.max_rows must be >= 1 or null, got {max_rows}.")
    rest = sorted((i for i in _all_ids(info) if i not in val_ids),
                  key=lambda i: _id_rank(i, seed + 1))
    return frozenset(rest[max_rows:])


def validation_ids(info: DatasetInfo, *, val_rows: int, seed: int) -> frozenset[str]:
    """The ``val_rows`` ids held out for validation: those with the smallest seeded hash, so the
    choice depends only on the ids and the seed (not on file order or the number of workers).

    At most a tenth of the data is held out: a small dataset keeps most of its rows for training.
    """
    if val_rows <= 0:
        return frozenset()
    ids = _all_ids(info)
    n = min(val_rows, len(ids) // 10)
    return frozenset(sorted(ids, key=lambda i: _id_rank(i, seed))[:n])


@dataclass
class ValidationRows:
    """The held-out rows, plain and picklable (passed to every worker)."""

    queries: list[str]
    responses: list[str]
    teacher: np.ndarray  # (rows, teacher_dim) float32

    def __len__(self) -> int:
        return len(self.queries)

    def head(self, n: int) -> ValidationRows:
        return ValidationRows(self.queries[:n], self.responses[:n], self.teacher[:n])


def read_validation_rows(info: DatasetInfo, ids: frozenset[str]) -> ValidationRows:
    """The rows of ``ids``, in a fixed order (sorted by id)."""
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    fs, _ = storage.filesystem(info.path)
    value_set = pa.array(sorted(ids), type=pa.string())
    parts = []
    for f in info.files:
        t = pq.read_table(f, columns=[schema.ID, *TRAIN_COLUMNS], filesystem=fs)
        parts.append(t.filter(pc.is_in(t[schema.ID], value_set=value_set)))
    table = pa.concat_tables(parts).sort_by(schema.ID) if parts else None
    if table is None or table.num_rows == 0:
        return ValidationRows([], [], np.zeros((0, info.teacher_dim), dtype=np.float32))
    batch = {c: table.column(c).to_numpy(zero_copy_only=False) for c in TRAIN_COLUMNS}
    queries, responses, teacher = batch_lists(batch)
    return ValidationRows(queries, responses, np.array(teacher, dtype=np.float32))


def read_probe_rows(
    info: DatasetInfo, n: int, *, exclude_ids: frozenset[str] = frozenset()
) -> ValidationRows:
    """The first ``n`` training rows in file order (for the ridge-probe reference)."""
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    if n <= 0:
        return ValidationRows([], [], np.zeros((0, info.teacher_dim), dtype=np.float32))
    fs, _ = storage.filesystem(info.path)
    excluded = pa.array(sorted(exclude_ids), type=pa.string())
    parts, have = [], 0
    for f in info.files:
        t = pq.read_table(f, columns=[schema.ID, *TRAIN_COLUMNS], filesystem=fs)
        if len(excluded):
            t = t.filter(pc.invert(pc.is_in(t[schema.ID], value_set=excluded)))
        parts.append(t.slice(0, n - have))
        have += parts[-1].num_rows
        if have >= n:
            break
    table = pa.concat_tables(parts)
    batch = {c: table.column(c).to_numpy(zero_copy_only=False) for c in TRAIN_COLUMNS}
    queries, responses, teacher = batch_lists(batch)
    return ValidationRows(queries, responses, np.array(teacher, dtype=np.float32))


def target_moments(
    info: DatasetInfo, *, exclude_ids: frozenset[str] = frozenset()
) -> tuple[int, np.ndarray, np.ndarray]:
    """(rows, sum, sum of squares) of the teacher embeddings per dimension, in float64, over the
    training rows; streamed file by file and batch by batch so memory stays small."""
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    fs, _ = storage.filesystem(info.path)
    excluded = pa.array(sorted(exclude_ids), type=pa.string())
    n, total = 0, np.zeros(info.teacher_dim)
    total_sq = np.zeros(info.teacher_dim)
    for f in info.files:
        with fs.open_input_file(f) as handle:
            for batch in pq.ParquetFile(handle).iter_batches(
                batch_size=4096, columns=[schema.ID, schema.TEACHER_EMBEDDING]
            ):
                if len(excluded):
                    batch = batch.filter(pc.invert(pc.is_in(batch.column(0), value_set=excluded)))
                if batch.num_rows == 0:
                    continue
                emb = batch.column(1)
                x = emb.flatten().to_numpy().reshape(len(emb), info.teacher_dim).astype(np.float64)
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
    exactly the remaining batches of an uninterrupted run. ``shuffle_buffer`` = 0 keeps file order.
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
