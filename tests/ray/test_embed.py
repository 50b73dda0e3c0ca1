"""``l2vg embed`` on a local Ray: the corpus -> embeddings equal to ``encode``, exactly once
after a real SIGKILL of the driver, and clear refusals to mix corpora or encoders."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from l2vg_ray import schema
from l2vg_ray.config import ConfigError, to_yaml
from l2vg_ray.embed import read_embeddings, run_embed

DRIVER = Path(__file__).with_name("embed_driver.py")
TEXTS = [f"Text number {i}: the sky, the sea and bread {i % 5}." for i in range(14)]


@pytest.fixture
def corpus(tmp_path):
    path = tmp_path / "corpus.jsonl"
    path.write_text("".join(json.dumps({"id": f"doc-{i}", "text": t}) + "\n"
                            for i, t in enumerate(TEXTS)))
    return path


@pytest.fixture
def embed_cfg(tiny_config, corpus, tiny_teacher_dir):
    cfg = tiny_config
    cfg.embed.input = str(corpus)
    cfg.embed.model = "teacher"  # the baseline: the tiny sentence-transformers teacher
    cfg.embed.batch_size = 3
    cfg.embed.rows_per_shard = 4
    cfg.embed.keep_text = True
    cfg.embed.num_cpus_per_actor = 0.5
    return cfg


def _encoder(cfg):
    from l2vg_ray.text_encoders import SentenceTransformerEncoder

    return SentenceTransformerEncoder(str(cfg.model.teacher), device="cpu")


def test_embed_writes_every_text_once_equal_to_encode(ray_session, embed_cfg):
    manifest = run_embed(embed_cfg)
    table = read_embeddings(embed_cfg.embed.output_dir)
    assert sorted(table.column(schema.ID).to_pylist()) == sorted(f"doc-{i}" for i in range(14))
    assert manifest["rows"] == 14 == manifest["rows_embedded"] and manifest["dim"] == 32
    assert len(manifest["shards"]) == 4 and manifest["texts_per_s"] > 0
    rows = {r["id"]: r for r in table.to_pylist()}
    direct = _encoder(embed_cfg).encode(TEXTS)
    got = np.array([rows[f"doc-{i}"]["embedding"] for i in range(14)])
    np.testing.assert_allclose(got, direct, atol=1e-5)
    assert rows["doc-3"]["text"] == TEXTS[3]
    again = run_embed(embed_cfg)
    assert again["rows_embedded"] == 0 and again["rows_skipped_existing"] == 14
    assert [p["rows_embedded"] for p in again["passes"]] == [14, 0]
    # Another encoder into the same folder would mix two embedding spaces: refused.
    embed_cfg.embed.normalize = True
    with pytest.raises(ConfigError, match="resuming would mix two encoders"):
        run_embed(embed_cfg)


def test_ids_default_to_text_hashes_and_duplicates_are_refused(ray_session, embed_cfg, tmp_path):
    txt = tmp_path / "lines.txt"
    txt.write_text("\n".join(TEXTS[:5]) + "\n\n")
    embed_cfg.embed.input = str(txt)
    embed_cfg.embed.id_column = None
    embed_cfg.embed.output_dir = str(tmp_path / "emb-txt")
    manifest = run_embed(embed_cfg)
    ids = read_embeddings(tmp_path / "emb-txt").column(schema.ID).to_pylist()
    assert sorted(ids) == sorted(schema.query_id(t) for t in TEXTS[:5]) and manifest["rows"] == 5
    dup = tmp_path / "dup.jsonl"
    dup.write_text(json.dumps({"id": "a", "text": "x"}) + "\n" + json.dumps({"id": "a", "text": "y"}) + "\n")
    embed_cfg.embed.input = str(dup)
    embed_cfg.embed.id_column = "id"
    with pytest.raises(ConfigError, match="id 'a' was already used at .*dup.jsonl line 1"):
        run_embed(embed_cfg)
    embed_cfg.embed.input = str(tmp_path / "nothing-here")
    with pytest.raises(ConfigError, match="does not exist"):
        run_embed(embed_cfg)


def _wait_for_half_written_shard(proc, out_dir: Path, log_path: Path, timeout_s: float = 300):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"the driver exited ({proc.returncode}) before the kill:\n{log_path.read_text()[-3000:]}")
        if list(out_dir.glob("part-*.parquet")) and list(out_dir.glob(".part-*.tmp")):
            return
        time.sleep(0.05)
    pytest.fail(f"no shard after {timeout_s} s:\n{log_path.read_text()[-3000:]}")


def test_resume_after_sigkill_is_exactly_once(ray_session, embed_cfg, tmp_path):
    out_dir = Path(embed_cfg.embed.output_dir)
    config_path = tmp_path / "config.yaml"
    config_path.write_text(to_yaml(embed_cfg))
    log_path = tmp_path / "driver.log"
    address = ray_session.get_runtime_context().gcs_address
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "PYTHONUNBUFFERED": "1"}
    with log_path.open("w") as log:
        proc = subprocess.Popen([sys.executable, str(DRIVER), str(config_path), address],
                                stdout=log, stderr=subprocess.STDOUT, env=env)
        try:
            _wait_for_half_written_shard(proc, out_dir, log_path)
        finally:
            proc.send_signal(signal.SIGKILL)
            proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    assert len(list(out_dir.glob("part-*.parquet"))) == 1 and not (out_dir / schema.MANIFEST_FILE).exists()

    manifest = run_embed(embed_cfg)
    ids = read_embeddings(out_dir).column(schema.ID).to_pylist()
    assert len(ids) == len(set(ids)), "a text was embedded twice"
    assert set(ids) == {f"doc-{i}" for i in range(14)}, "texts are missing"
    assert manifest["rows_skipped_existing"] == 4 and manifest["rows_embedded"] == 10
    assert not list(out_dir.glob(".*.tmp"))


def _vectors(out_dir) -> dict[str, np.ndarray]:
    return {r["id"]: np.array(r["embedding"]) for r in read_embeddings(out_dir).to_pylist()}


def test_a_changed_or_other_corpus_is_refused_and_sync_makes_every_vector_current(
        ray_session, embed_cfg, tmp_path):
    """The stale-vector scenario: same ids, other texts. Refused by default (nothing changed);
    with embed.sync=true every stored vector equals a fresh embedding of the current text and the
    ids no longer in the input are gone. The folder stays readable throughout."""
    out_dir = embed_cfg.embed.output_dir
    run_embed(embed_cfg)
    before = _vectors(out_dir)

    edited = list(TEXTS)
    edited[3] = "A completely different text about rivers."
    other = tmp_path / "other.jsonl"  # doc-0..doc-11 with one text edited; doc-12, doc-13 gone
    other.write_text("".join(json.dumps({"id": f"doc-{i}", "text": t}) + "\n"
                             for i, t in enumerate(edited[:12])))
    embed_cfg.embed.input = str(other)
    with pytest.raises(ConfigError, match=r"1 of its ids hold the vector of another text.*"
                                          r"2 of its ids are not in.*embed.sync=true"):
        run_embed(embed_cfg)
    assert _vectors(out_dir).keys() == before.keys()  # nothing was changed

    embed_cfg.embed.sync = True
    manifest = run_embed(embed_cfg)
    assert manifest["rows_reembedded_changed"] == 1 and manifest["rows_dropped"] == 3
    assert manifest["rows_embedded"] == 1 and manifest["rows"] == 12
    after = _vectors(out_dir)
    assert sorted(after) == sorted(f"doc-{i}" for i in range(12))
    fresh = _encoder(embed_cfg).encode(edited[:12])
    np.testing.assert_allclose(np.array([after[f"doc-{i}"] for i in range(12)]), fresh, atol=1e-5)
    assert read_embeddings(out_dir).column("text").to_pylist().count(edited[3]) == 1


def test_keep_text_is_part_of_the_folder_identity(ray_session, embed_cfg):
    embed_cfg.embed.keep_text = False
    run_embed(embed_cfg)
    embed_cfg.embed.keep_text = True
    with pytest.raises(ConfigError, match="keep_text"):
        run_embed(embed_cfg)
    assert read_embeddings(embed_cfg.embed.output_dir).num_rows == 14  # still readable
