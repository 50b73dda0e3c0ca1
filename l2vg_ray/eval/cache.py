"""Embedding cache keyed by (encoder fingerprint, instruction, text), safe under concurrent writers.

One SQLite file per cache directory, in WAL mode with a busy timeout: several Ray tasks on one
node read and write it at once (WAL lets readers proceed during a write; the timeout makes a
writer wait for the lock instead of failing). Rows are immutable (``INSERT OR IGNORE``), so two
processes racing on the same text both end up with the same stored vector.

``CachedEncoder`` wraps any ``TextEncoder``: it looks every (instruction, text) up, encodes only
the misses (deduplicated), stores them and returns embeddings in input order. Vectors are stored
unnormalised; ``normalize=True`` is applied after the lookup, so one entry serves both.
"""

from __future__ import annotations

import hashlib
import os
import sqlite3
import threading
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from l2vg_ray.text_encoders import TextEncoder

CACHE_FILE = "embeddings.sqlite"
_SCHEMA = """
CREATE TABLE IF NOT EXISTS embeddings (
    fingerprint TEXT NOT NULL,
    key TEXT NOT NULL,
    dim INTEGER NOT NULL,
    vector BLOB NOT NULL,
    PRIMARY KEY (fingerprint, key)
) WITHOUT ROWID
"""
# SQLite caps the number of bound parameters per statement; stay well below it.
_LOOKUP_CHUNK = 500


def text_key(instruction: str | None, text: str) -> str:
    """Stable key of one (instruction, text) pair; ``None`` and "" instructions are the same."""
    h = hashlib.sha256()
    h.update((instruction or "").encode("utf-8"))
    h.update(b"\x00")
    h.update(text.encode("utf-8"))
    return h.hexdigest()


class EmbeddingCache:
    """A SQLite store of float32 vectors; one connection per process (opened lazily)."""

    def __init__(self, directory: str | Path, *, timeout_s: float = 60.0) -> None:
        self.directory = Path(directory).expanduser()
        self.path = self.directory / CACHE_FILE
        self.timeout_s = timeout_s
        self._conn: sqlite3.Connection | None = None
        self._pid: int | None = None
        self._lock = threading.Lock()

    def __getstate__(self) -> dict:
        # Connections cannot cross processes: a pickled cache reopens its own on first use.
        state = self.__dict__.copy()
        state["_conn"] = None
        state["_pid"] = None
        state["_lock"] = None
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()

    def _connection(self) -> sqlite3.Connection:
        if self._conn is None or self._pid != os.getpid():
            from filelock import FileLock

            self.directory.mkdir(parents=True, exist_ok=True)
            # Switching a new file to WAL and creating the table take locks that SQLite's busy
            # timeout does not wait for: processes opening a fresh cache together (the corpus
            # shards of one task) would get "database is locked". One at a time, they don't.
            with FileLock(str(self.path) + ".setup.lock", timeout=self.timeout_s):
                conn = sqlite3.connect(self.path, timeout=self.timeout_s, check_same_thread=False)
                conn.execute(f"PRAGMA busy_timeout = {int(self.timeout_s * 1000)}")
                conn.execute("PRAGMA journal_mode = WAL")
                conn.execute("PRAGMA synchronous = NORMAL")
                conn.execute(_SCHEMA)
                conn.commit()
            self._conn, self._pid = conn, os.getpid()
        return self._conn

    def get(self, fingerprint: str, keys: Sequence[str]) -> dict[str, np.ndarray]:
        """The stored vectors of those ``keys`` that are present."""
        found: dict[str, np.ndarray] = {}
        unique = list(dict.fromkeys(keys))
        with self._lock:
            conn = self._connection()
            for i in range(0, len(unique), _LOOKUP_CHUNK):
                chunk = unique[i : i + _LOOKUP_CHUNK]
                marks = ",".join("?" * len(chunk))
                rows = conn.execute(
                    f"SELECT key, dim, vector FROM embeddings WHERE fingerprint = ? AND key IN ({marks})",
                    [fingerprint, *chunk],
                ).fetchall()
                for key, dim, blob in rows:
                    found[key] = np.frombuffer(blob, dtype=np.float32, count=dim)
        return found

    def put(self, fingerprint: str, keys: Sequence[str], vectors: np.ndarray) -> None:
        if len(keys) != len(vectors):
            raise ValueError(f"put: {len(keys)} keys but {len(vectors)} vectors.")
        vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        rows = [(fingerprint, k, int(v.shape[0]), v.tobytes()) for k, v in zip(keys, vectors, strict=True)]
        with self._lock:
            conn = self._connection()
            with conn:  # one transaction: one lock acquisition per batch
                conn.executemany(
                    "INSERT OR IGNORE INTO embeddings (fingerprint, key, dim, vector) VALUES (?, ?, ?, ?)",
                    rows,
                )

    def count(self, fingerprint: str | None = None) -> int:
        with self._lock:
            conn = self._connection()
            if fingerprint is None:
                return conn.execute("SELECT COUNT(*) FROM embeddings").fetchone()[0]
            return conn.execute(
                "SELECT COUNT(*) FROM embeddings WHERE fingerprint = ?", (fingerprint,)
            ).fetchone()[0]

    def close(self) -> None:
        if self._conn is not None and self._pid == os.getpid():
            self._conn.close()
        self._conn = None


class CachedEncoder:
    """A ``TextEncoder`` that serves repeated (instruction, text) pairs from an ``EmbeddingCache``.

    ``hits`` / ``misses`` count texts served from the cache / sent to the wrapped encoder.
    ``CachedEncoder.deferred`` wraps a loader instead of a loaded encoder: the model is loaded on
    the first cache miss, so a task whose texts are all cached never loads it (``loaded``).
    """

    def __init__(self, encoder: TextEncoder, cache: EmbeddingCache) -> None:
        self._start(cache, name=encoder.name, dim=encoder.dim, fingerprint=encoder.fingerprint())
        self._encoder = encoder

    @classmethod
    def deferred(
        cls, loader: Callable[[], TextEncoder], cache: EmbeddingCache, *, name: str, dim: int,
        fingerprint: str,
    ) -> CachedEncoder:
        """Cache in front of ``loader()``, called once, at the first text the cache lacks.
        ``name``, ``dim`` and ``fingerprint`` must be the loaded encoder's (checked on load)."""
        self = cls.__new__(cls)
        self._start(cache, name=name, dim=dim, fingerprint=fingerprint)
        self._loader = loader
        return self

    def _start(self, cache: EmbeddingCache, *, name: str, dim: int, fingerprint: str) -> None:
        self._encoder: TextEncoder | None = None
        self._loader: Callable[[], TextEncoder] | None = None
        self.cache = cache
        self.name, self.dim, self._fingerprint = name, int(dim), str(fingerprint)
        self.hits = 0
        self.misses = 0

    @property
    def loaded(self) -> bool:
        """Whether the wrapped model is in this process's memory (always, unless built by
        ``deferred`` or wrapping a remote encoder)."""
        return self._encoder is not None and bool(getattr(self._encoder, "loaded", True))

    @property
    def encoder(self) -> TextEncoder:
        if self._encoder is None:
            encoder = self._loader()
            if encoder.fingerprint() != self._fingerprint or int(encoder.dim) != self.dim:
                raise RuntimeError(
                    f"The loaded encoder {encoder.name!r} has fingerprint {encoder.fingerprint()} "
                    f"and dim {encoder.dim}, but its cache was keyed as {self._fingerprint} / "
                    f"{self.dim}: the cheap fingerprint disagrees with the model's (a bug).")
            self._encoder = encoder
        return self._encoder

    def encode(
        self,
        texts: Sequence[str],
        *,
        instruction: str | None = None,
        batch_size: int = 32,
        normalize: bool = False,
        show_progress: bool = False,
    ) -> np.ndarray:
        texts = list(texts)
        keys = [text_key(instruction, t) for t in texts]
        found = self.cache.get(self._fingerprint, keys)
        missing: dict[str, str] = {}
        for k, t in zip(keys, texts, strict=True):
            if k not in found and k not in missing:
                missing[k] = t
        self.hits += len(texts) - len(missing)  # in-batch duplicates count as hits
        self.misses += len(missing)
        if missing:
            new = self.encoder.encode(
                list(missing.values()),
                instruction=instruction,
                batch_size=batch_size,
                normalize=False,
                show_progress=show_progress,
            )
            new = np.asarray(new, dtype=np.float32)
            self.cache.put(self._fingerprint, list(missing), new)
            found.update(zip(missing, new, strict=True))
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        for i, k in enumerate(keys):
            out[i] = found[k]
        if normalize and len(out):
            out /= np.maximum(np.linalg.norm(out, axis=1, keepdims=True), 1e-12)
        return out

    def fingerprint(self) -> str:
        return self._fingerprint

    @property
    def tokenizer(self):
        return self.encoder.tokenizer

    @property
    def max_input_tokens(self) -> int:
        return self.encoder.max_input_tokens

    def count_tokens(self, texts: Sequence[str], *, instruction: str | None = None) -> list[int]:
        return self.encoder.count_tokens(texts, instruction=instruction)
