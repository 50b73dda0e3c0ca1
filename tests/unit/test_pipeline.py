"""Stage-skip logic of run_pipeline with fake stage functions (no Ray, no models)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from l2vg_ray import pipeline, storage
from l2vg_ray.config import ConfigError, load_config, typed


class FakeStages:
    """Stage functions that write one file into their output folder and record their calls."""

    def __init__(self, fail: str | None = None):
        self.calls: list[tuple[str, bool]] = []
        self.fail = fail

    def runners(self):
        return {stage: self._make(stage) for stage in pipeline.STAGES}

    def _make(self, stage):
        def run(cfg, *, resume=False):
            self.calls.append((stage, resume))
            out = Path(pipeline.stage_output(cfg, stage))
            out.mkdir(parents=True, exist_ok=True)
            (out / "part.txt").write_text(f"{stage} lr={cfg.train.lr}")
            if stage == self.fail:
                raise RuntimeError(f"{stage} crashed")
            return {"rows": 3, "file": str(out / "part.txt")}

        return run

    def ran(self):
        return [stage for stage, _ in self.calls]


def make_cfg(tmp_path, *overrides):
    return load_config(None, [f"output_dir={tmp_path / 'out'}", *overrides])


def run(cfg, fakes, *, overwrite=False):
    return pipeline.run_pipeline(cfg, runners=fakes.runners(), overwrite=overwrite)


def test_first_run_runs_all_stages_and_writes_markers(tmp_path, capsys):
    fakes = FakeStages()
    result = run(make_cfg(tmp_path), fakes)
    assert fakes.ran() == ["generate", "train", "eval"]
    assert [r["status"] for r in result["stages"].values()] == ["ran", "ran", "ran"]
    assert result["ok"] is True
    for stage in pipeline.STAGES:
        marker = json.loads((Path(result["stages"][stage]["output"]) / pipeline.SUCCESS).read_text())
        assert marker["config_hash"] == result["stages"][stage]["config_hash"]
        assert marker["summary"] == {"rows": 3, "file": result["stages"][stage]["summary"]["file"]}
    assert result["artifacts"]["data"] == str(tmp_path / "out" / "data")
    assert result["artifacts"]["encoder"] == str(tmp_path / "out" / "train" / "final")
    assert result["artifacts"]["eval.file"].endswith("eval/part.txt")
    assert "l2vg pipeline summary" in capsys.readouterr().out


def test_same_config_skips_every_stage_and_returns_stored_summaries(tmp_path):
    first = run(make_cfg(tmp_path), FakeStages())
    fakes = FakeStages()
    again = run(make_cfg(tmp_path), fakes)
    assert fakes.ran() == []
    assert [r["status"] for r in again["stages"].values()] == ["skipped"] * 3
    assert again["stages"]["train"]["summary"] == first["stages"]["train"]["summary"]


def test_resource_settings_do_not_rerun(tmp_path):
    run(make_cfg(tmp_path), FakeStages())
    fakes = FakeStages()
    run(
        make_cfg(
            tmp_path,
            "generate.num_actors=4",
            "train.num_workers=2",
            "train.cpus_per_worker=3",
            "eval.max_concurrency=8",
            "eval.num_gpus_per_task=1",
        ),
        fakes,
    )
    assert fakes.ran() == []


def test_changed_config_stops_naming_the_keys_and_deletes_nothing(tmp_path):
    run(make_cfg(tmp_path), FakeStages())
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    fakes = FakeStages()
    with pytest.raises(ConfigError, match=r"\[train\].*differing keys: train\.lr.*name=NEW_NAME.*--overwrite"):
        run(make_cfg(tmp_path, "train.lr=1e-3"), fakes)
    assert fakes.ran() == []
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before
    with pytest.raises(ConfigError, match=r"\[generate\].*generate\.max_tokens"):
        run(make_cfg(tmp_path, "generate.max_tokens=7"), FakeStages())


def test_overwrite_reruns_train_and_eval_from_a_clean_folder(tmp_path):
    run(make_cfg(tmp_path), FakeStages())
    stale = tmp_path / "out" / "train" / "old-checkpoint"
    stale.mkdir()
    fakes = FakeStages()
    result = run(make_cfg(tmp_path, "train.lr=1e-3"), fakes, overwrite=True)
    assert fakes.ran() == ["train", "eval"]  # eval reads the encoder, so it follows train
    assert result["stages"]["generate"]["status"] == "skipped"
    assert not stale.exists(), "output of the old config must be removed before the rerun"
    assert (tmp_path / "out" / "train" / "part.txt").read_text() == "train lr=0.001"


def test_a_new_name_moves_the_output_instead(tmp_path):
    run(load_config(None, [f"output_dir={tmp_path}/${{name}}", "name=a"]), FakeStages())
    fakes = FakeStages()
    run(load_config(None, [f"output_dir={tmp_path}/${{name}}", "name=b", "train.lr=1e-3"]), fakes)
    assert fakes.ran() == ["generate", "train", "eval"]
    assert (tmp_path / "a" / "train" / "part.txt").read_text().endswith("lr=0.0003")


def test_special_token_settings_rerun_training_but_keep_the_data(tmp_path):
    run(make_cfg(tmp_path), FakeStages())
    fakes = FakeStages()
    run(make_cfg(tmp_path, "model.n_thought=4"), fakes, overwrite=True)
    assert fakes.ran() == ["train", "eval"]


def test_changed_generate_config_reruns_everything_with_overwrite(tmp_path):
    run(make_cfg(tmp_path), FakeStages())
    fakes = FakeStages()
    run(make_cfg(tmp_path, "generate.max_tokens=7"), fakes, overwrite=True)
    assert fakes.ran() == ["generate", "train", "eval"]


def test_a_larger_query_set_extends_the_data_in_place(tmp_path):
    run(make_cfg(tmp_path, "generate.queries.limit=10"), FakeStages())
    kept = tmp_path / "out" / "data" / "part.txt"
    fakes = FakeStages()
    # Only the query set changed: generate reruns in place (no deletion, rows reused); the
    # training it feeds is then another result, which needs --overwrite (or a new name).
    with pytest.raises(ConfigError, match=r"\[train\].*upstream\.generate"):
        run(make_cfg(tmp_path, "generate.queries.limit=20"), fakes)
    assert fakes.ran() == ["generate"] and kept.exists()


def test_baseline_eval_does_not_depend_on_training(tmp_path):
    run(make_cfg(tmp_path, "eval.model=teacher"), FakeStages())
    fakes = FakeStages()
    result = run(make_cfg(tmp_path, "eval.model=teacher", "train.lr=1e-3"), fakes, overwrite=True)
    assert fakes.ran() == ["train"]
    assert result["artifacts"]["encoder"] is None


def test_interrupted_stage_reruns_and_resumes_in_place(tmp_path):
    with pytest.raises(RuntimeError, match="train crashed"):
        run(make_cfg(tmp_path), FakeStages(fail="train"))
    train_dir = tmp_path / "out" / "train"
    assert (train_dir / pipeline.STARTED).exists()
    assert not (train_dir / pipeline.SUCCESS).exists()
    fakes = FakeStages()
    run(make_cfg(tmp_path), fakes)
    assert fakes.calls == [("train", False), ("eval", False)]  # no checkpoint yet: fresh start


def test_interrupted_training_with_a_checkpoint_resumes_from_it(tmp_path):
    from l2vg_ray.train.trainer import RUN_PREFIX, SNAPSHOT_FILE

    with pytest.raises(RuntimeError, match="train crashed"):
        run(make_cfg(tmp_path), FakeStages(fail="train"))
    run_dir = tmp_path / "out" / "train" / "ray_results" / f"{RUN_PREFIX}20260101-000000-abcdef"
    run_dir.mkdir(parents=True)
    (run_dir / SNAPSHOT_FILE).write_text("{}")
    fakes = FakeStages()
    result = run(make_cfg(tmp_path), fakes)
    assert fakes.calls == [("train", True), ("eval", False)]
    assert result["stages"]["train"]["status"] == "resumed"
    assert run_dir.exists(), "a partial run of the same config is resumed, not deleted"


def test_interrupted_stage_with_another_config_is_cleared(tmp_path):
    with pytest.raises(RuntimeError):
        run(make_cfg(tmp_path), FakeStages(fail="generate"))
    leftover = tmp_path / "out" / "data" / "shard-0.parquet"
    leftover.write_text("stale")
    fakes = FakeStages()
    with pytest.raises(ConfigError, match="generate.temperature"):
        run(make_cfg(tmp_path, "generate.temperature=0.7"), fakes)
    assert leftover.exists()
    run(make_cfg(tmp_path, "generate.temperature=0.7"), fakes, overwrite=True)
    assert fakes.calls[0] == ("generate", False)
    assert not leftover.exists()


def test_stage_reporting_failures_gets_no_marker_and_is_retried(tmp_path):
    fakes = FakeStages()
    runners = fakes.runners()
    runners["eval"] = lambda cfg: {"scores": {"A": 0.5, "B": None}, "failed": {"B": "boom"}}
    result = pipeline.run_pipeline(make_cfg(tmp_path), runners=runners)
    assert result["ok"] is False
    assert result["stages"]["eval"]["status"] == "incomplete"
    assert not (tmp_path / "out" / "eval" / pipeline.SUCCESS).exists()
    again = FakeStages()
    result = run(make_cfg(tmp_path), again)
    assert again.ran() == ["eval"] and result["ok"] is True


def test_tasks_without_data_are_a_warning_and_a_rerun_adds_them(tmp_path, capsys):
    fakes = FakeStages()
    runners = fakes.runners()
    missing = {"B": {"dataset": "b", "package": "gone==1.0", "reason": "not served", "fix": "place it"}}
    runners["eval"] = lambda cfg: {"scores": {"A": 0.5, "B": None}, "failed": {},
                                   "missing": missing, "n_ok": 1, "mean_main_score": 0.5}
    result = pipeline.run_pipeline(make_cfg(tmp_path), runners=runners)
    assert result["ok"] is True  # the run succeeds, with a warning
    assert result["stages"]["eval"]["status"] == "ran without some data"
    assert "B: no data" in capsys.readouterr().out
    assert not (tmp_path / "out" / "eval" / pipeline.SUCCESS).exists()
    again = FakeStages()
    run(make_cfg(tmp_path), again)
    assert again.ran() == ["eval"]  # retried once the data may be there


def test_refuses_to_delete_a_folder_holding_other_stages(tmp_path):
    cfg = make_cfg(tmp_path, f"eval.output_dir={tmp_path / 'out'}")
    run(cfg, FakeStages())
    with pytest.raises(ValueError, match="eval.output_dir"):
        run(make_cfg(tmp_path, f"eval.output_dir={tmp_path / 'out'}", "eval.suite=list"), FakeStages(),
            overwrite=True)
    assert (tmp_path / "out" / "data" / "part.txt").exists()


def test_fingerprint_ignores_locations_but_not_the_trained_encoder(tmp_path):
    a = pipeline.stage_fingerprint(make_cfg(tmp_path / "a"), "eval", "h1")
    b = pipeline.stage_fingerprint(make_cfg(tmp_path / "b"), "eval", "h1")
    assert pipeline.config_hash(a) == pipeline.config_hash(b)
    c = pipeline.stage_fingerprint(make_cfg(tmp_path / "a"), "eval", "h2")
    assert pipeline.config_hash(a) != pipeline.config_hash(c)


def test_unreadable_marker_counts_as_missing(tmp_path):
    run(make_cfg(tmp_path), FakeStages())
    (tmp_path / "out" / "eval" / pipeline.SUCCESS).write_text("{not json")
    fakes = FakeStages()
    run(make_cfg(tmp_path), fakes)
    assert fakes.ran() == ["eval"]


def test_absolute_paths_resolves_local_paths_only(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "my-llm").mkdir()
    cfg = load_config(
        None,
        ["output_dir=rel/out", "model.llm=my-llm", "eval.model=teacher", "cluster.storage_path=s3://b/x"],
    )
    out = storage.absolute_paths(cfg)
    assert out.output_dir == str(tmp_path / "rel" / "out")
    assert out.generate.output_dir == str(tmp_path / "rel" / "out" / "data")
    assert out.model.llm == str(tmp_path / "my-llm")
    assert out.model.teacher == "all-minilm-l6-v2"  # a packaged name, not a path
    assert out.eval.model == "teacher"
    assert out.cluster.storage_path == "s3://b/x"
    assert cfg.output_dir == "rel/out", "the caller's config is not modified"
    assert os.path.isabs(out.cache_dir)


def test_storage_round_trip_and_uri_join(tmp_path):
    path = str(tmp_path / "a" / "b.json")
    storage.write_json(path, {"x": 1})
    assert storage.read_json(path) == {"x": 1}
    assert storage.exists("file://" + path)
    storage.delete(str(tmp_path / "a"))
    assert not storage.exists(path)
    assert storage.join("s3://bucket/run/", "data", "x.parquet") == "s3://bucket/run/data/x.parquet"
    with pytest.raises(ValueError, match="s3://bucket"):
        storage.filesystem("nosuchscheme://x/y")


def test_multinode_warnings_name_local_outputs(tmp_path):
    cfg = make_cfg(tmp_path)
    assert storage.warn_if_not_shared(cfg, 1) == []
    warnings = storage.warn_if_not_shared(cfg, 3)
    assert storage.warn_if_not_shared(typed(cfg), 3) == warnings  # the CLI passes the typed config
    assert any("train.output_dir" in w for w in warnings)
    assert any("cluster.storage_path" in w for w in warnings)
    shared = make_cfg(tmp_path, "output_dir=s3://bucket/run", "cluster.storage_path=s3://bucket/ckpt")
    assert storage.warn_if_not_shared(shared, 3) == []


def test_resource_fields_are_left_out_of_the_stage_hash_and_the_rest_is_in(tmp_path):
    """Which keys a stage's hash skips is declared on the config field (resource_field)."""
    from l2vg_ray.config import TrainConfig, load_config, not_hashed

    skipped = not_hashed(TrainConfig)
    assert {"num_workers", "output_dir", "tracking"} <= skipped
    assert "lr" not in skipped and "batch_size" not in skipped

    def train_hash(*overrides: str) -> str:
        cfg = load_config(None, [f"output_dir={tmp_path}", *overrides])
        return pipeline.config_hash(pipeline.stage_fingerprint(cfg, "train", "up"))

    base = train_hash()
    for override in ("train.num_workers=4", "train.log_every=3", "train.tracking.kind=mlflow",
                     "model.device=cpu", "train.cpus_per_worker=2"):
        assert train_hash(override) == base, override
    for override in ("train.lr=0.5", "train.batch_size=3", "model.n_thought=3"):
        assert train_hash(override) != base, override
