"""The generation pipeline on a local Ray with the tiny models (transformers backend).

- end to end: exact schema, one row per cleaned query (ids = query_id(query)), manifest; a rerun
  skips everything and writes nothing;
- exactly once after a real kill: a subprocess driver is SIGKILLed with one shard complete and
  the next one written but not yet renamed; the rerun ends with exactly the expected ids.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from l2vg_ray import schema
from l2vg_ray.config import to_yaml
from l2vg_ray.dataset import OutputDir, read_done_ids, read_generated, read_generated_table
from l2vg_ray.generate.pipeline import run_generate
from l2vg_ray.generate.queries import load_queries

DRIVER = Path(__file__).with_name("generate_driver.py")


def _expected_ids(cfg) -> set[str]:
    queries, _ = load_queries(cfg)
    return {schema.query_id(q) for q in queries}


def test_end_to_end_then_rerun_skips_everything(ray_session, tiny_config, tiny_teacher_dir):
    cfg = tiny_config
    cfg.generate.rows_per_shard = 5
    out_dir = Path(cfg.generate.output_dir)

    manifest = run_generate(cfg)

    expected = _expected_ids(cfg)
    shards = sorted(p.name for p in out_dir.glob("part-*.parquet"))
    assert len(shards) == 3  # 12 queries at 5 rows per shard: 5 + 5 + 2
    assert [pq.read_metadata(out_dir / s).num_rows for s in shards] == [5, 5, 2]
    table = read_generated_table(out_dir)
    assert table.schema.equals(schema.dataset_schema(manifest["teacher_dim"]))
    ids = table.column(schema.ID).to_pylist()
    assert len(ids) == len(set(ids)) and set(ids) == expected
    rows = table.to_pylist()
    assert all(r[schema.ID] == schema.query_id(r[schema.QUERY]) for r in rows)
    assert all(0 <= r[schema.RESPONSE_TOKENS] <= cfg.generate.max_tokens for r in rows)
    assert {r[schema.GENERATOR_MODEL] for r in rows} == {str(cfg.model.llm)}
    assert json.loads(rows[0][schema.SAMPLING_PARAMS])["max_tokens"] == cfg.generate.max_tokens
    # Each stored embedding is the teacher's embedding of that row's own response.
    from sentence_transformers import SentenceTransformer

    teacher = SentenceTransformer(str(tiny_teacher_dir), device="cpu")
    probe = rows[:3]
    direct = teacher.encode([r[schema.RESPONSE] for r in probe], convert_to_numpy=True)
    np.testing.assert_allclose(
        np.array([r[schema.TEACHER_EMBEDDING] for r in probe]), direct, rtol=1e-4, atol=1e-5
    )

    on_disk = json.loads((out_dir / schema.MANIFEST_FILE).read_text())
    assert on_disk["rows"] == manifest["rows"] == 12 and manifest["rows_generated"] == 12
    assert manifest["query_stats"]["kept"] == 12 and manifest["backend"] == "transformers"
    assert manifest["generated_tokens"] == sum(r[schema.RESPONSE_TOKENS] for r in rows)
    assert manifest["config"]["generate"]["rows_per_shard"] == 5
    assert {"ray", "torch", "transformers", "pyarrow"} <= set(manifest["versions"])
    assert manifest["throughput"]["generate_busy_s"] > 0
    assert sorted(s["file"] for s in manifest["shards"]) == shards
    # Ray Data reads the same rows back.
    assert read_generated(out_dir).count() == 12

    again = run_generate(cfg)
    assert again["rows_generated"] == 0 and again["rows_skipped_existing"] == 12
    # The first pass's work stays in the manifest's history.
    assert [p["rows_generated"] for p in again["passes"]] == [12, 0]
    assert again["passes"][0]["throughput"] == manifest["throughput"]
    assert sorted(p.name for p in out_dir.glob("part-*.parquet")) == shards

    # A smaller query set would leave rows training still reads: refused, nothing deleted.
    from l2vg_ray.config import ConfigError

    cfg.generate.queries.limit = 8
    with pytest.raises(ConfigError, match="4 rows whose queries are not in this run's query set"):
        run_generate(cfg)
    assert sorted(p.name for p in out_dir.glob("part-*.parquet")) == shards


def _wait_for_half_written_shard(proc, out_dir: Path, log_path: Path, timeout_s: float = 300):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"the driver exited ({proc.returncode}) before the kill:\n{log_path.read_text()[-3000:]}")
        shards = list(out_dir.glob("part-*.parquet"))
        temps = list(out_dir.glob(".part-*.tmp"))
        if shards and temps:
            return
        time.sleep(0.05)
    pytest.fail(f"no shard after {timeout_s} s:\n{log_path.read_text()[-3000:]}")


def test_resume_after_sigkill_is_exactly_once(ray_session, tiny_config, tmp_path):
    cfg = tiny_config
    cfg.generate.rows_per_shard = 3
    out_dir = Path(cfg.generate.output_dir)
    config_path = tmp_path / "config.yaml"
    config_path.write_text(to_yaml(cfg))
    log_path = tmp_path / "driver.log"
    address = ray_session.get_runtime_context().gcs_address
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "PYTHONUNBUFFERED": "1"}
    with log_path.open("w") as log:
        proc = subprocess.Popen(
            [sys.executable, str(DRIVER), str(config_path), address],
            stdout=log, stderr=subprocess.STDOUT, env=env,
        )
        try:
            _wait_for_half_written_shard(proc, out_dir, log_path)
        finally:
            proc.send_signal(signal.SIGKILL)
            proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL

    # The state a kill leaves: one complete shard, one temp file that must not count, no manifest.
    out = OutputDir.from_path(out_dir)
    done_before, _ = read_done_ids(out)
    assert len(done_before) == 3
    assert list(out_dir.glob(".part-*.tmp")) and not (out_dir / schema.MANIFEST_FILE).exists()

    manifest = run_generate(cfg)

    expected = _expected_ids(cfg)
    ids = read_generated_table(out_dir).column(schema.ID).to_pylist()
    assert len(ids) == len(set(ids)), "a row was written twice"
    assert set(ids) == expected, "rows are missing"
    assert done_before <= set(ids)
    assert manifest["rows_skipped_existing"] == 3 and manifest["rows_generated"] == 9
    assert manifest["rows"] == 12
    assert not list(out_dir.glob(".*.tmp"))
