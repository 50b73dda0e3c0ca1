"""The generated dataset (l2vg_ray.dataset): shard writing, reading back, resume bookkeeping and
training's inspection (no Ray)."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from l2vg_ray import schema
from l2vg_ray.config import ConfigError
from l2vg_ray.dataset import (
    PROVENANCE_KEY,
    OutputDir,
    ShardWriter,
    batch_to_table,
    inspect_dataset,
    read_done_ids,
    read_generated_table,
)
from l2vg_ray.generate.pipeline import _check_resume_compatible
from l2vg_ray.testing import write_fixture_dataset

DIM = 4


def _batch(start: int, n: int) -> dict[str, np.ndarray]:
    queries = [f"query {i}" for i in range(start, start + n)]
    return {
        schema.ID: np.array([schema.query_id(q) for q in queries], dtype=object),
        schema.QUERY: np.array(queries, dtype=object),
        schema.RESPONSE: np.array([f"answer {q}" for q in queries], dtype=object),
        schema.TEACHER_EMBEDDING: np.arange(n * DIM, dtype=np.float64).reshape(n, DIM) + start,
        schema.GENERATOR_MODEL: np.array(["llm"] * n, dtype=object),
        schema.TEACHER_MODEL: np.array(["teacher"] * n, dtype=object),
        schema.SAMPLING_PARAMS: np.array(['{"temperature": 0.0}'] * n, dtype=object),
        schema.RESPONSE_TOKENS: np.arange(n, dtype=np.int64),
        "_extra": np.zeros(n),  # hidden columns are dropped
    }


def test_batch_to_table_has_the_exact_schema():
    table = batch_to_table(_batch(0, 3), DIM)
    assert table.schema.equals(schema.dataset_schema(DIM))
    assert table.column(schema.TEACHER_EMBEDDING).to_pylist()[1] == [4.0, 5.0, 6.0, 7.0]
    with pytest.raises(ValueError, match=r"shape \(3, 4\), expected \(rows, 8\)"):
        batch_to_table(_batch(0, 3), 8)
    bad = _batch(0, 3)
    del bad[schema.RESPONSE]
    with pytest.raises(ValueError, match="lacks \\['response'\\]"):
        batch_to_table(bad, DIM)


def test_shard_writer_cuts_exact_shards_and_writes_the_rest_once(tmp_path):
    out = OutputDir.from_path(tmp_path / "data")
    out.fs.create_dir(out.root)
    writer = ShardWriter(out, rows_per_shard=4, provenance={"generator_model": "llm"})
    for start, n in [(0, 3), (3, 3), (6, 7), (13, 1)]:  # 14 rows arriving in odd batches
        writer.add(batch_to_table(_batch(start, n), DIM))
    writer.close()
    writer.close()  # idempotent: nothing is written twice
    shards = out.shards()
    assert [pq.read_metadata(out.join(s)).num_rows for s in shards] == [4, 4, 4, 2]
    table = read_generated_table(tmp_path / "data")
    assert table.column(schema.QUERY).to_pylist() == [f"query {i}" for i in range(14)]
    done, provenance = read_done_ids(out)
    assert len(done) == 14 and [p["rows"] for p in provenance] == [4, 4, 4, 2]
    assert all(p["generator_model"] == "llm" for p in provenance)
    # A second writer (a resumed run) continues the numbering, never overwriting.
    more = ShardWriter(out, rows_per_shard=4, provenance={})
    more.add(batch_to_table(_batch(14, 1), DIM))
    more.close()
    assert out.shards()[:4] == shards and out.shards()[4].startswith("part-00004-")


def test_temp_files_never_count_and_are_cleaned(tmp_path):
    out = OutputDir.from_path(tmp_path)
    ShardWriter(out, 10, {}).add(batch_to_table(_batch(0, 10), DIM))
    # What a kill between write and rename leaves behind.
    pq.write_table(batch_to_table(_batch(10, 5), DIM), tmp_path / ".part-00001-abcdef12.parquet.x.tmp")
    done, _ = read_done_ids(out)
    assert len(done) == 10
    assert read_generated_table(tmp_path).num_rows == 10
    assert out.remove_stale_temps() == 1 and not list(tmp_path.glob(".*"))


def test_the_manifest_keeps_every_pass_and_the_last_on_top(tmp_path):
    out = OutputDir.from_path(tmp_path)
    fields = ("rows_new", "wall_s")
    assert out.read_manifest() == {}
    # A manifest from before `passes` counts as the first pass.
    (tmp_path / schema.MANIFEST_FILE).write_text(json.dumps({"rows": 5, "rows_new": 5, "wall_s": 9.0}))
    second = out.write_manifest({"rows": 5, "rows_new": 0, "wall_s": 0.5}, fields)
    third = out.write_manifest({"rows": 7, "rows_new": 2, "wall_s": 3.0}, fields)
    on_disk = json.loads((tmp_path / schema.MANIFEST_FILE).read_text())
    assert on_disk == third and second["passes"] == third["passes"][:2]
    assert (third["rows"], third["rows_new"]) == (7, 2)
    assert third["written_at"] >= second["written_at"]  # the writer stamps each manifest
    assert third["passes"] == [{"rows_new": 5, "wall_s": 9.0}, {"rows_new": 0, "wall_s": 0.5},
                               {"rows_new": 2, "wall_s": 3.0}]
    assert not list(tmp_path.glob(".*"))  # no temp file left behind
    # An unreadable manifest is not history: the folder starts a new one.
    (tmp_path / schema.MANIFEST_FILE).write_text("{not json")
    assert out.write_manifest({"rows_new": 1, "wall_s": 1.0}, fields)["passes"] == [
        {"rows_new": 1, "wall_s": 1.0}]


def test_read_generated_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="No generated shards.*l2vg generate"):
        read_generated_table(tmp_path)
    bad = pa.table({schema.ID: ["a"], schema.QUERY: ["q"]})
    pq.write_table(bad, tmp_path / "part-00000-0000abcd.parquet")
    with pytest.raises(ValueError, match="no 'teacher_embedding' column.*fresh generate.output_dir"):
        read_generated_table(tmp_path)


def test_read_generated_rejects_mixed_teacher_dims(tmp_path):
    out = OutputDir.from_path(tmp_path)
    ShardWriter(out, 10, {}).add(batch_to_table(_batch(0, 10), DIM))
    b = _batch(10, 10)
    b[schema.TEACHER_EMBEDDING] = np.zeros((10, 8))
    ShardWriter(out, 10, {}).add(batch_to_table(b, 8))
    with pytest.raises(ValueError, match=r"mix teacher dimensions \[4, 8\]"):
        read_generated_table(tmp_path)


def test_provenance_is_in_the_footer_and_resume_refuses_other_settings(tmp_path):
    out = OutputDir.from_path(tmp_path)
    ShardWriter(out, 10, {"generator_model": "llm-a", "sampling_params": "{}"}).add(
        batch_to_table(_batch(0, 10), DIM)
    )
    meta = pq.read_schema(out.join(out.shards()[0])).metadata
    assert json.loads(meta[PROVENANCE_KEY])["generator_model"] == "llm-a"
    _, previous = read_done_ids(out)
    _check_resume_compatible(previous, {"generator_model": "llm-a"}, out.uri)
    with pytest.raises(ConfigError, match="generator_model='llm-a'.*'llm-b'.*fresh folder"):
        _check_resume_compatible(previous, {"generator_model": "llm-b"}, out.uri)


def test_output_dir_may_be_a_uri(tmp_path):
    uri = f"file://{tmp_path}/data"
    out = OutputDir.from_path(uri)
    out.fs.create_dir(out.root, recursive=True)
    writer = ShardWriter(out, 3, {})
    writer.add(batch_to_table(_batch(0, 5), DIM))
    writer.close()
    assert len(list((tmp_path / "data").glob("part-*.parquet"))) == 2
    assert read_generated_table(uri).num_rows == 5
    assert len(read_done_ids(OutputDir.from_path(uri))[0]) == 5


def test_inspect_dataset_reads_rows_and_teacher_dim(tmp_path):
    path = write_fixture_dataset(tmp_path / "data", n_rows=10, teacher_dim=16)
    (path / ".part-00001.parquet.tmp").write_text("half written")  # ignored
    info = inspect_dataset(str(path))
    assert (info.num_rows, info.teacher_dim, len(info.files)) == (10, 16, 1)


def test_missing_or_empty_data_dir_fails_with_the_fix(tmp_path):
    with pytest.raises(ConfigError, match="does not exist.*l2vg generate"):
        inspect_dataset(str(tmp_path / "nope"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match=r"holds no generated shards \(part-\*\.parquet\)"):
        inspect_dataset(str(tmp_path / "empty"))


def test_data_without_training_columns_is_rejected(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    # The generated dataset's rules (l2vg_ray.dataset.generated_shards): shards are named
    # part-*.parquet and carry the whole schema; anything else is not training data.
    (tmp_path / "d").mkdir()
    pq.write_table(pa.table({schema.QUERY: ["q"]}), tmp_path / "d" / "x.parquet")
    with pytest.raises(ConfigError, match="holds no generated shards"):
        inspect_dataset(str(tmp_path / "d"))
    pq.write_table(pa.table({schema.QUERY: ["q"]}), tmp_path / "d" / "part-00000-0000abcd.parquet")
    with pytest.raises(ConfigError, match="train.data_dir=.*no 'teacher_embedding' column"):
        inspect_dataset(str(tmp_path / "d"))
