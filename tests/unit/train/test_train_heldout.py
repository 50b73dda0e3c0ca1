"""Held-out validation and its references (l2vg_ray.train.validation), and the one read of the
training data that splits it (train.data.read_training_data)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from l2vg_ray.dataset import inspect_dataset
from l2vg_ray.method.losses import TargetStats
from l2vg_ray.train import data as train_data
from l2vg_ray.train import validation as V


def test_trivial_references_by_hand():
    val = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    stats = TargetStats(mean=torch.tensor([0.5, 0.5]), var=torch.tensor([0.25, 0.25]))
    refs = V.trivial_references(stats, val)
    assert refs.zero_mse == pytest.approx(0.5)  # (1 + 0 + 0 + 1) / 4
    assert refs.mean_mse == pytest.approx(0.25)  # every element off by 0.5
    assert refs.mean_cos == pytest.approx(2**-0.5)
    assert refs.val_rows == 2 and refs.probe_mse is None


def test_ridge_probe_recovers_a_linear_map_and_picks_lambda_on_training_rows():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(400, 6, generator=g)
    w = torch.randn(6, 3, generator=g)
    y = x @ w + 0.01 * torch.randn(400, 3, generator=g)
    mse, cos, lam = V.ridge_probe(x[:300], y[:300], x[300:], y[300:])
    assert mse < 1e-3 and cos > 0.99 and lam in V.RIDGE_LAMBDAS
    # Pure noise targets: the probe cannot beat the mean by much.
    noise = torch.randn(400, 3, generator=g)
    mse, _, _ = V.ridge_probe(x[:300], noise[:300], x[300:], noise[300:])
    assert mse > 0.8
    with pytest.raises(ValueError, match="at least 10"):
        V.ridge_probe(x[:5], y[:5], x[5:9], y[5:9])


def test_mse_and_cos():
    a, b = torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 2.0]])
    assert V.mse_and_cos(a, b) == (pytest.approx(2.5), pytest.approx(0.0))


def _fixture(tmp_path, n_rows: int = 40):
    """The fixture dataset's info and its whole table (one shard)."""
    import pyarrow.parquet as pq

    from l2vg_ray.testing import write_fixture_dataset

    info = inspect_dataset(str(write_fixture_dataset(tmp_path / "d", n_rows=n_rows)))
    return info, pq.read_table(info.files[0])


def test_validation_ids_are_a_seeded_tenth_at_most_and_stable(tmp_path):
    _, table = _fixture(tmp_path)
    all_ids = table.column("id").to_pylist()
    ids = train_data.validation_ids(all_ids, val_rows=100, seed=3)
    assert len(ids) == 4  # capped at a tenth of 40 rows
    assert ids == train_data.validation_ids(all_ids[::-1], val_rows=100, seed=3)  # order-free
    assert ids != train_data.validation_ids(all_ids, val_rows=100, seed=4)
    assert train_data.validation_ids(all_ids, val_rows=0, seed=3) == frozenset()


def test_one_read_gives_heldout_probe_moments_and_training_rows(tmp_path):
    info, table = _fixture(tmp_path)
    ids = train_data.validation_ids(table.column("id").to_pylist(), val_rows=100, seed=3)
    data = train_data.read_training_data(info, val_rows=100, max_rows=None, probe_rows=10, seed=3)
    rows = data.heldout
    assert len(rows) == 4 and rows.teacher.shape == (4, 32) and rows.teacher.dtype == np.float32
    by_id = sorted(i for i in table.column("id").to_pylist() if i in ids)
    queries = dict(zip(table.column("id").to_pylist(), table.column("query").to_pylist(), strict=True))
    assert rows.queries == [queries[i] for i in by_id]  # sorted by id
    # The training rows: the rest, ordered by id, only the training columns.
    order = np.argsort(np.array(table.column("id").to_pylist()), kind="stable")
    emb = np.stack(table.column("teacher_embedding").to_pylist())
    keep = np.array([i not in ids for i in table.column("id").to_pylist()])
    assert data.num_rows == 36 and data.tables[0].column_names == list(train_data.TRAIN_COLUMNS)
    # Moments over the training rows only, equal to a direct computation.
    n, total, sq = train_data.target_moments(data.tables, chunk_rows=7)
    assert n == 36
    np.testing.assert_allclose(total, emb[keep].sum(0), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(sq, (emb[keep] ** 2).sum(0), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(data.stats.mean, torch.from_numpy(emb[keep].mean(0)).float())
    # The probe rows: the first training rows by id.
    all_queries = table.column("query").to_pylist()
    kept_queries = [all_queries[j] for j in order if keep[j]]
    assert data.probe.queries == kept_queries[:10] and not set(data.probe.queries) & set(rows.queries)


def test_training_rows_depend_on_the_rows_not_on_files_or_their_order(tmp_path):
    """The same rows written in another order across other files (as a teacher stage whose actors
    finish in another order writes them) give the same blocks, probe and held-out rows; blocks
    are fixed id ranges of BLOCK_ROWS rows, cut before the held-out rows leave."""
    import pyarrow.parquet as pq

    info, table = _fixture(tmp_path, n_rows=50)
    shuffled = tmp_path / "shuffled"
    shuffled.mkdir()
    perm = np.random.default_rng(1).permutation(table.num_rows)
    for k, part in enumerate(np.array_split(perm, 3)):
        pq.write_table(table.take(part), shuffled / f"part-{k:05d}-0000000{k}.parquet")
    other = inspect_dataset(str(shuffled))
    assert len(other.files) == 3
    a, b = (train_data.read_training_data(i, val_rows=5, max_rows=None, probe_rows=8, seed=2)
            for i in (info, other))
    assert [t.num_rows for t in a.tables] == [t.num_rows for t in b.tables]
    assert all(x.equals(y) for x, y in zip(a.tables, b.tables, strict=True))
    assert a.probe.queries == b.probe.queries and a.heldout.queries == b.heldout.queries
    # Blocks of BLOCK_ROWS ids each, minus the held-out rows inside them.
    by_id = table.sort_by("id")
    blocks = train_data.id_blocks(by_id, block_rows=16)
    assert [t.num_rows for t in blocks] == [16, 16, 16, 2]
    assert blocks[1].column("id").to_pylist() == by_id.column("id").to_pylist()[16:32]
    assert sum(t.num_rows for t in a.tables) == 45 and len(a.heldout) == 5


def test_validate_reports_raw_mse_and_skips_recon_at_zero_weight(tiny_llm_dir):
    from l2vg_ray.config import ModelConfig
    from l2vg_ray.method import L2VGEncoder

    enc = L2VGEncoder.from_config(
        ModelConfig(llm=str(tiny_llm_dir), teacher="x", n_thought=1, n_compression=2,
                    max_length=24, max_response_length=8, device="cpu"), teacher_dim=4)
    t = np.random.default_rng(0).standard_normal((5, 4)).astype(np.float32)
    rows = train_data.ValidationRows([f"q{i}?" for i in range(5)], [f"a{i}." for i in range(5)], t)
    stats = TargetStats.from_targets(torch.from_numpy(t))
    m = V.heldout_metrics(enc, rows, batch_size=2, recon_weight=1.0, align_loss="normalized-mse",
                   target_stats=stats)
    expected, _ = V.mse_and_cos(torch.from_numpy(enc.encode(rows.queries)), torch.from_numpy(t))
    assert m["val_align_mse"] == pytest.approx(expected, rel=1e-5)
    assert m["val_align_loss"] == pytest.approx(expected / stats.mean_vector_mse, rel=1e-4)
    assert np.isfinite(m["val_recon_loss"])
    m0 = V.heldout_metrics(enc, rows, batch_size=2, recon_weight=0.0, align_loss="mse", target_stats=None)
    assert np.isnan(m0["val_recon_loss"]) and m0["val_align_mse"] == pytest.approx(expected, rel=1e-5)


def test_max_rows_keeps_a_seeded_subset_of_the_training_rows(tmp_path):
    from l2vg_ray.config import ConfigError

    info, table = _fixture(tmp_path)
    ids = table.column("id").to_pylist()
    val = train_data.validation_ids(ids, val_rows=4, seed=0)
    unused = train_data.unused_ids(ids, val_ids=val, max_rows=10, seed=0)
    assert len(unused) == 26 and not unused & val
    assert unused == train_data.unused_ids(ids, val_ids=val, max_rows=10, seed=0)
    assert train_data.unused_ids(ids, val_ids=val, max_rows=None, seed=0) == frozenset()
    data = train_data.read_training_data(info, val_rows=4, max_rows=10, probe_rows=0, seed=0)
    assert data.num_rows == 10 and len(data.heldout) == 4 and len(data.probe) == 0
    assert train_data.target_moments(data.tables)[0] == 10
    with pytest.raises(ConfigError, match="max_rows"):
        train_data.unused_ids(ids, val_ids=val, max_rows=0, seed=0)
