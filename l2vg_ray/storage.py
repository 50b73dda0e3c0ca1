"""Artifact locations: local paths or URIs (``s3://``, ``gs://``, ``file://``) behind one API.

Every stage writes under a location taken from config. On one machine that is a local path; on a
multi-node cluster it must be storage every node reaches: an object store URI (``s3://bucket/x``,
``gs://bucket/x``) or a path on a shared mount (NFS, EFS, Filestore) present at the same path on
every node. Nothing here assumes the driver and the workers share a disk: URIs go through
``pyarrow.fs`` and local paths are made absolute on the driver, so a Ray worker whose working
directory differs still writes where the driver reads.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import posixpath
import uuid
from typing import Any

import pyarrow.fs as pafs
from omegaconf import DictConfig, OmegaConf

log = logging.getLogger(__name__)

# Config keys holding output/input locations that are always paths (never model names).
PATH_KEYS = (
    "output_dir",
    "cache_dir",
    "generate.output_dir",
    "generate.queries.path",
    "train.data_dir",
    "train.output_dir",
    "eval.output_dir",
    "eval.cache_dir",
    "llm2vec.output_dir",
    "llm2vec.corpus.path",
    "embed.input",
    "embed.output_dir",
    "cluster.storage_path",
)
# Keys that hold either a path or a name (hub id, baseline, packaged model): made absolute only
# when they name an existing local path.
MAYBE_PATH_KEYS = (
    "model.llm", "model.teacher", "teacher.model", "teacher.adapter", "eval.model", "serve.model",
    "embed.model", "decode.model", "export.model", "llm2vec.llm",
)


def is_uri(path: str) -> bool:
    """True for ``scheme://...`` locations (``s3://``, ``gs://``, ``file://``, ``hdfs://``)."""
    return "://" in str(path)


def is_local(path: str) -> bool:
    """True for plain paths and ``file://`` URIs: storage only this node sees, unless shared."""
    return not is_uri(path) or str(path).startswith("file://")


def absolute(path: str) -> str:
    """A local path made absolute (``~`` expanded); URIs are returned unchanged."""
    path = str(path)
    if is_uri(path):
        return path
    return os.path.abspath(os.path.expanduser(path))


def join(base: str, *parts: str) -> str:
    """Join path segments with ``/`` for URIs and ``os.path.join`` for local paths."""
    if is_uri(base):
        return posixpath.join(str(base).rstrip("/"), *parts)
    return os.path.join(str(base), *parts)


def filesystem(path: str) -> tuple[pafs.FileSystem, str]:
    """``(pyarrow filesystem, path inside it)`` for a local path or a URI."""
    try:
        return pafs.FileSystem.from_uri(absolute(path))
    except (ValueError, OSError) as e:  # pyarrow's ArrowInvalid is a ValueError
        raise ValueError(
            f"Cannot open storage location {path!r}: {e}. Use a local path or a URI such as "
            f"s3://bucket/prefix or gs://bucket/prefix (with that filesystem's credentials set)."
        ) from e


def exists(path: str) -> bool:
    fs, p = filesystem(path)
    return fs.get_file_info(p).type != pafs.FileType.NotFound


def is_file(path: str) -> bool:
    fs, p = filesystem(path)
    return fs.get_file_info(p).type == pafs.FileType.File


def open_input(path: str):
    """A binary, seekable file object: the builtin ``open`` for local paths (what pandas and
    ``io.TextIOWrapper`` read best), the filesystem's random-access file for URIs."""
    if not is_uri(path):
        return open(absolute(path), "rb")
    fs, p = filesystem(path)
    return fs.open_input_file(p)


def read_bytes(path: str) -> bytes:
    fs, p = filesystem(path)
    with fs.open_input_stream(p) as f:
        return f.read()


def write_bytes(path: str, data: bytes) -> None:
    """Write ``data`` to ``path``; local writes go through a temp file + rename (atomic)."""
    fs, p = filesystem(path)
    fs.create_dir(posixpath.dirname(p) or "/", recursive=True)
    if isinstance(fs, pafs.LocalFileSystem):
        tmp = f"{p}.tmp-{uuid.uuid4().hex[:8]}"
        with fs.open_output_stream(tmp) as f:
            f.write(data)
        os.replace(tmp, p)
    else:  # object stores make a single PUT visible atomically
        with fs.open_output_stream(p) as f:
            f.write(data)


def read_text(path: str) -> str:
    return read_bytes(path).decode("utf-8")


def write_text(path: str, text: str) -> None:
    write_bytes(path, text.encode("utf-8"))


def read_json(path: str) -> Any:
    return json.loads(read_text(path))


def write_json(path: str, obj: Any) -> None:
    write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


def delete(path: str) -> None:
    """Remove a file or a directory tree; a missing path is not an error."""
    fs, p = filesystem(path)
    info = fs.get_file_info(p)
    if info.type == pafs.FileType.Directory:
        fs.delete_dir(p)
    elif info.type == pafs.FileType.File:
        fs.delete_file(p)


def absolute_paths(cfg: DictConfig) -> DictConfig:
    """A copy of ``cfg`` whose local relative locations are absolute (resolved on this node).

    Only keys set to plain values change: an interpolation such as ``${output_dir}/data`` follows
    the (now absolute) value it points to. Model specs change only when they name an existing
    local path, so hub ids and baseline names stay as they are.
    """
    cfg = copy.deepcopy(cfg)  # keeps the structured (dataclass-typed) config and struct mode
    for key, must_be_path in [(k, True) for k in PATH_KEYS] + [(k, False) for k in MAYBE_PATH_KEYS]:
        parent_key, _, leaf = key.rpartition(".")
        parent = OmegaConf.select(cfg, parent_key) if parent_key else cfg
        if parent is None or leaf not in parent or OmegaConf.is_interpolation(parent, leaf):
            continue
        value = parent[leaf]
        if not isinstance(value, str) or is_uri(value):
            continue
        if must_be_path or os.path.exists(os.path.expanduser(value)):
            parent[leaf] = absolute(value)
    return cfg


def warn_if_not_shared(cfg: Any, num_nodes: int) -> list[str]:
    """On a multi-node cluster, warn about outputs on node-local paths; returns the warnings.
    ``cfg`` is the typed config or a DictConfig (attributes only)."""
    if num_nodes <= 1:
        return []
    outputs = {f"{s}.output_dir": str(getattr(cfg, s).output_dir) for s in ("generate", "train", "eval")}
    storage = cfg.cluster.storage_path
    warnings = [
        f"{key}={value!r} is a local path on a {num_nodes}-node cluster: "
        f"every node must see it at the same path (an NFS/EFS mount), otherwise set output_dir "
        f"to s3://... or gs://..."
        for key, value in outputs.items()
        if is_local(value)
    ]
    if storage is None or is_local(str(storage)):
        warnings.append(
            f"cluster.storage_path={storage!r}: Ray Train checkpoints need storage every node "
            f"reaches on a {num_nodes}-node cluster (s3://..., gs://... or a shared mount)."
        )
    for w in warnings:
        log.warning(w)
    return warnings
