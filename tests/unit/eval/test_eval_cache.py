"""Embedding cache: hits skip the encoder, keys separate instructions, concurrent writers agree."""

from __future__ import annotations

import multiprocessing as mp

import numpy as np
import pytest

from l2vg_ray.eval.cache import CachedEncoder, EmbeddingCache, text_key


class CountingEncoder:
    """Deterministic fake encoder: a text's vector depends on (instruction, text) only."""

    name = "counting"
    dim = 4

    def __init__(self, fp: str = "fp-1") -> None:
        self.calls: list[list[str]] = []
        self._fp = fp

    def encode(self, texts, *, instruction=None, batch_size=32, normalize=False, show_progress=False):
        self.calls.append(list(texts))
        rows = []
        for t in texts:
            seed = int(text_key(instruction, t)[:8], 16)
            rows.append(np.random.default_rng(seed).normal(size=self.dim))
        return np.asarray(rows, dtype=np.float32).reshape(len(texts), self.dim)

    def fingerprint(self):
        return self._fp

    def count_tokens(self, texts):
        return [len(t.split()) for t in texts]


def test_second_encode_computes_nothing(tmp_path):
    enc = CountingEncoder()
    cached = CachedEncoder(enc, EmbeddingCache(tmp_path))
    texts = ["a b", "c", "a b", "d e f"]
    first = cached.encode(texts, instruction="q")
    assert enc.calls == [["a b", "c", "d e f"]]  # duplicates encoded once
    assert cached.misses == 3 and cached.hits == 1
    second = cached.encode(list(reversed(texts)), instruction="q")
    assert len(enc.calls) == 1  # nothing recomputed
    np.testing.assert_array_equal(second, first[::-1])
    assert cached.hits == 1 + 4


def test_cache_persists_across_instances_and_separates_keys(tmp_path):
    enc = CountingEncoder()
    CachedEncoder(enc, EmbeddingCache(tmp_path)).encode(["x", "y"], instruction=None)
    again = CachedEncoder(enc, EmbeddingCache(tmp_path))
    again.encode(["x", "y"], instruction="")  # "" and None are the same key
    assert len(enc.calls) == 1
    again.encode(["x"], instruction="other")  # a new instruction is a new key
    assert enc.calls[-1] == ["x"]
    other_fp = CachedEncoder(CountingEncoder("fp-2"), EmbeddingCache(tmp_path))
    other_fp.encode(["x"])
    assert other_fp.misses == 1  # another fingerprint never reads these vectors


def test_deferred_encoder_loads_only_on_a_miss(tmp_path):
    enc = CountingEncoder()
    CachedEncoder(enc, EmbeddingCache(tmp_path)).encode(["x", "y"], instruction="q")
    loads = []

    def loader():
        loads.append(1)
        return enc

    lazy = CachedEncoder.deferred(loader, EmbeddingCache(tmp_path), name=enc.name, dim=enc.dim,
                                  fingerprint=enc.fingerprint())
    warm = lazy.encode(["y", "x"], instruction="q")
    assert loads == [] and not lazy.loaded and lazy.hits == 2  # all cached: never loaded
    assert len(enc.calls) == 1
    lazy.encode(["z"], instruction="q")
    assert loads == [1] and lazy.loaded and enc.calls[-1] == ["z"]
    lazy.encode(["w"], instruction="q")
    assert loads == [1]  # loaded once
    np.testing.assert_array_equal(warm, CachedEncoder(enc, EmbeddingCache(tmp_path)).encode(
        ["y", "x"], instruction="q"))

    wrong = CachedEncoder.deferred(lambda: enc, EmbeddingCache(tmp_path), name=enc.name,
                                   dim=enc.dim, fingerprint="not-the-model's")
    with pytest.raises(RuntimeError, match="fingerprint"):
        wrong.encode(["new text"])


def test_normalize_is_applied_after_lookup(tmp_path):
    cached = CachedEncoder(CountingEncoder(), EmbeddingCache(tmp_path))
    raw = cached.encode(["x"])
    unit = cached.encode(["x"], normalize=True)
    assert cached.misses == 1
    np.testing.assert_allclose(np.linalg.norm(unit, axis=1), 1.0, rtol=1e-6)
    np.testing.assert_allclose(unit[0], raw[0] / np.linalg.norm(raw[0]), rtol=1e-6)


def _writer(path: str, start: int, q) -> None:
    cache = EmbeddingCache(path, timeout_s=30)
    enc = CachedEncoder(CountingEncoder(), cache)
    for i in range(20):
        enc.encode([f"text {j}" for j in range(start + i, start + i + 10)], instruction="q")
    q.put(enc.misses)


def test_concurrent_writers(tmp_path):
    ctx = mp.get_context("fork")
    q = ctx.Queue()
    procs = [ctx.Process(target=_writer, args=(str(tmp_path), s, q)) for s in (0, 5, 10)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    cache = EmbeddingCache(tmp_path)
    assert cache.count("fp-1") == 39  # texts 0..38, each stored once
    enc = CountingEncoder()
    out = CachedEncoder(enc, cache).encode([f"text {j}" for j in range(39)], instruction="q")
    assert enc.calls == []
    np.testing.assert_allclose(out, CountingEncoder().encode([f"text {j}" for j in range(39)], instruction="q"))


def test_put_rejects_mismatched_lengths(tmp_path):
    with pytest.raises(ValueError, match="2 keys but 1 vectors"):
        EmbeddingCache(tmp_path).put("fp", ["a", "b"], np.zeros((1, 4), dtype=np.float32))
