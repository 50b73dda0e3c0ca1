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
    from l2vg_ray.encoders import SentenceTransformerEncoder

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
    with pytest.raises(ValueError, match="id 'a' appears more than once"):
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
