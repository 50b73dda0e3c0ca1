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

from l2vg_ray import schema
from l2vg_ray.config import ConfigError
from l2vg_ray.train.batching import BatchPlan, micro_batches_per_epoch

# Columns the training loop reads; the rest of the generated schema stays on disk.
TRAIN_COLUMNS = (schema.QUERY, schema.RESPONSE, schema.TEACHER_EMBEDDING)


@dataclass(frozen=True)
class DatasetInfo:
    path: str
    files: tuple[str, ...]  # Parquet files on the path's filesystem, sorted (a fixed read order)
    num_rows: int
    teacher_dim: int


def _filesystem(path: str):
    import pyarrow.fs as pafs

    try:
        return pafs.FileSystem.from_uri(path)
    except (pa.ArrowInvalid, ValueError):  # a relative local path
        from pathlib import Path

        return pafs.LocalFileSystem(), str(Path(path).resolve())


def inspect_dataset(path: str) -> DatasetInfo:
    """Read the Parquet footers under ``path`` (local or URI): files, row count, teacher dim.

    Raises ConfigError naming the path and the fix when the folder is missing, holds no Parquet,
    lacks a training column, or its teacher column is not a fixed-size float list.
    """
    import pyarrow.dataset as pads
    import pyarrow.fs as pafs

    fix = "Run `l2vg generate -c CONFIG` first, or point train.data_dir at the generated data."
    fs, root = _filesystem(str(path))
    info = fs.get_file_info(root)
    if info.type == pafs.FileType.NotFound:
        raise ConfigError(f"train.data_dir={str(path)!r} does not exist. {fix}")
    if info.type == pafs.FileType.File:
        files = [root] if root.endswith(".parquet") else []
    else:
        # Hidden files are in-progress writes (temp files renamed into place when complete).
        files = sorted(
            f.path
            for f in fs.get_file_info(pafs.FileSelector(root))
            if f.type == pafs.FileType.File
            and f.base_name.endswith(".parquet")
            and not f.base_name.startswith(".")
        )
    if not files:
        raise ConfigError(f"train.data_dir={str(path)!r} holds no .parquet files. {fix}")
    dataset = pads.dataset(files, format="parquet", filesystem=fs)
    missing = [c for c in TRAIN_COLUMNS if c not in dataset.schema.names]
    if missing:
        raise ConfigError(
            f"The data in {str(path)!r} lacks columns {missing} (it has {dataset.schema.names}). "
            f"It was not written by `l2vg generate`; regenerate it."
        )
    emb_type = dataset.schema.field(schema.TEACHER_EMBEDDING).type
    if not pa.types.is_fixed_size_list(emb_type):
        raise ConfigError(
            f"Column {schema.TEACHER_EMBEDDING!r} in {str(path)!r} has type {emb_type}; expected "
            f"a fixed-size float list (l2vg_ray.schema.dataset_schema). Regenerate the data."
        )
    num_rows = dataset.count_rows()
    if num_rows == 0:
        raise ConfigError(f"train.data_dir={str(path)!r} holds 0 rows. {fix}")
    return DatasetInfo(
        path=str(path), files=tuple(files), num_rows=num_rows, teacher_dim=emb_type.list_size
    )


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


def read_train_dataset(info: DatasetInfo):
    """The Ray Dataset of the training columns, files in a fixed order."""
    import ray.data

    fs, _ = _filesystem(info.path)
    # Materialised in the driver, before the workers claim their CPUs: on a small node the
    # workers hold every core and Ray Data excludes them from its budget, so a read task
    # scheduled later would wait forever. Only the three training columns are kept (in the
    # object store, shared by the workers of a node, spilled to disk when large); every epoch
    # and every restart then splits the same blocks in the same order.
    return ray.data.read_parquet(
        list(info.files), columns=list(TRAIN_COLUMNS), filesystem=fs
    ).materialize()


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
