"""``l2vg embed``'s input reading and resume planning, without Ray: every input row is accounted
for, every unusable input is one clear error naming its file and row."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from l2vg_ray import schema
from l2vg_ray.config import InputError
from l2vg_ray.dataset import OutputDir, drop_rows, write_shard
from l2vg_ray.embed import plan_resume, read_corpus


def _jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return str(path)


def _read(path, **kw):
    kw.setdefault("id_column", "id")
    return read_corpus(str(path), text_column="text", **kw)


@pytest.mark.parametrize("row,what", [
    ({"id": "b", "text": None}, "has text=None"),
    ({"id": "b"}, "has no 'text' field"),
    ({"id": "b", "text": ""}, "has text=''"),
    ({"id": "b", "text": "   "}, "has text='   '"),
])
def test_a_row_without_text_is_refused_with_its_line_or_skipped_and_counted(tmp_path, row, what):
    path = _jsonl(tmp_path / "c.jsonl", [{"id": "a", "text": "fine"}, row, {"id": "c", "text": "ok"}])
    with pytest.raises(InputError, match=rf"c.jsonl line 2 {what}.*embed.skip_empty=true"):
        _read(path)
    corpus = _read(path, skip_empty=True)
    assert corpus.ids == ["a", "c"] and corpus.skipped_empty == 1


def test_a_line_over_a_mebibyte_is_read(tmp_path):
    big = "word " * 420_000  # 2.1 MB: over pyarrow's default JSON block
    corpus = _read(_jsonl(tmp_path / "c.jsonl", [{"id": "a", "text": big}, {"id": "b", "text": "x"}]))
    assert corpus.texts[0] == big and corpus.ids == ["a", "b"]


@pytest.mark.parametrize("lines,match", [
    (['{"id": "a", "text": "x"}', '{"id": "b", "text": '], r"line 2: not valid JSON"),
    (['["a list"]'], r"line 1: a JSON list, not an object"),
    ([{"id": "a", "text": 5}], r"line 1: text is a int"),
    ([{"id": 1.5, "text": "x"}], r"id=1.5 is a float"),
    ([{"id": "a", "text": "x"}, {"text": "y"}], r"1 rows have an 'id' and 1 do not"),
    ([{"id": "a", "text": "x"}, {"id": "a", "text": "y"}], r"line 2: id 'a' was already used at .*line 1"),
    ([], r"holds no texts"),
])
def test_unusable_input_is_one_error_naming_file_and_row(tmp_path, lines, match):
    with pytest.raises(InputError, match=match):
        _read(_jsonl(tmp_path / "c.jsonl", lines))


def test_invalid_utf8_names_the_file_and_line(tmp_path):
    path = tmp_path / "c.txt"
    path.write_bytes(b"fine\n\xff\xfe broken\n")
    with pytest.raises(InputError, match=r"c.txt line 2: not UTF-8"):
        _read(path)
    (tmp_path / "empty.txt").write_text("\n\n")
    with pytest.raises(InputError, match="holds no texts"):
        _read(tmp_path / "empty.txt")


def test_integer_ids_and_text_hash_ids_with_duplicate_texts_embedded_once(tmp_path):
    corpus = _read(_jsonl(tmp_path / "c.jsonl", [{"id": 1, "text": "x"}, {"id": 2, "text": "x"}]))
    assert corpus.ids == ["1", "2"]
    path = tmp_path / "lines.txt"
    path.write_text("same\nother\nsame\n")
    corpus = _read(path, id_column=None)  # the advice the duplicate-id error gives: it holds
    assert corpus.texts == ["same", "other"] and corpus.merged_duplicates == 1
    assert corpus.ids == [schema.query_id("same"), schema.query_id("other")]


def test_parquet_rows_are_numbered(tmp_path):
    pq.write_table(pa.table({"id": ["a", "b"], "text": ["x", None]}), tmp_path / "c.parquet")
    with pytest.raises(InputError, match=r"c.parquet row 2 has text=None"):
        _read(tmp_path / "c.parquet")


def test_plan_resume_skips_same_texts_and_names_changed_and_removed():
    stored = {"a": "h-a", "b": "h-old", "z": "h-z", "legacy": None}
    plan = plan_resume(["a", "b", "c", "legacy"], ["h-a", "h-b", "h-c", "h-l"], stored)
    assert plan.pending == [1, 2, 3]  # b changed, c new, legacy unknown: embedded (again)
    assert plan.changed == ["b", "legacy"] and plan.removed == ["z"]


def test_drop_rows_rewrites_shards_in_place_and_deletes_emptied_ones(tmp_path):
    out = OutputDir.from_path(tmp_path / "emb")
    out.fs.create_dir(out.root, recursive=True)
    write_shard(out, 0, pa.table({schema.ID: ["a", "b"]}), {"model": "m"})
    write_shard(out, 1, pa.table({schema.ID: ["c"]}), {"model": "m"})
    assert drop_rows(out, {"b", "c", "nope"}) == 2
    (name,) = out.shards()
    table = pq.read_table(out.join(name))
    assert table.column(schema.ID).to_pylist() == ["a"]
    prov = json.loads(table.schema.metadata[b"l2vg_provenance"])
    assert prov["rows"] == 1 and prov["model"] == "m"


def test_embed_stage_takes_typed_sections_and_checks_its_input_columns(tiny_config):
    import numpy as np
    import ray.data

    from l2vg_ray.config import EmbedConfig
    from l2vg_ray.embed import EMBEDDING, TEXT, TEXT_HASH, EmbedSpec, EmbedStage, embed_stage_kwargs
    from l2vg_ray.embed import text_hash as sha

    tiny_config.embed.model = "teacher"  # the baseline: the tiny sentence-transformers teacher
    tiny_config.embed.num_actors = 2
    tiny_config.embed.batch_size = 3
    kw = embed_stage_kwargs(tiny_config)
    assert set(kw) == {"fn_constructor_kwargs", "compute", "num_cpus", "num_gpus", "batch_size",
                       "max_restarts"}
    assert isinstance(kw["compute"], ray.data.ActorPoolStrategy) and kw["compute"].max_size == 2
    spec = kw["fn_constructor_kwargs"]["spec"]
    assert isinstance(spec, EmbedSpec) and isinstance(spec.embed, EmbedConfig)
    assert spec.embed.output_dir.endswith("out/embeddings")  # typed and resolved

    stage = EmbedStage(spec)
    texts = ["The sky is blue.", "Bread is baked."]
    out = stage({schema.ID: np.array(["a", "b"], dtype=object),
                 TEXT: np.array(texts, dtype=object),
                 TEXT_HASH: np.array([sha(t) for t in texts], dtype=object)})
    assert out[EMBEDDING].dtype == np.float32 and out[EMBEDDING].shape == (2, 32)
    assert list(out[schema.ID]) == ["a", "b"] and TEXT not in out  # keep_text is off
    with pytest.raises(ValueError, match=r"EmbedStage needs columns .*lacks \['text_sha256'\]"):
        stage({schema.ID: np.array(["a"], dtype=object), TEXT: np.array(texts[:1], dtype=object)})
    with pytest.raises(TypeError, match=r"EmbedStage takes spec: EmbedSpec, got DictConfig"):
        EmbedStage(tiny_config)
