"""Experiment tracking: config flattening, the registry, and an eval result logged to a real
MLflow store (the training side is tests/ray/test_train.py::test_training_is_tracked_in_mlflow)."""

from __future__ import annotations

import json

import pytest

from l2vg_ray.config import ConfigError, load_config
from l2vg_ray.tracking import TRACKERS, flatten, log_evaluation, tracked


def test_flatten_nested_config():
    assert flatten({"a": {"b": 1, "c": [1, 2]}, "d": [{"e": 3}], "f": None}) == {
        "a.b": 1,
        "a.c": [1, 2],
        "d.0.e": 3,
        "f": None,
    }


def test_trackers_registry_and_off_by_default(tmp_path):
    assert {"mlflow", "wandb"} <= set(TRACKERS.names())
    cfg = load_config(None, [f"output_dir={tmp_path}"])
    assert cfg.train.tracking.kind is None and cfg.eval.tracking.kind is None
    with tracked(cfg, "eval") as tracker:
        assert tracker is None
    assert not (tmp_path / "mlruns").exists()
    with pytest.raises(ValueError, match="train.tracking.kind='mlfow' is unknown"):
        load_config(None, ["train.tracking.kind=mlfow"])


def test_evaluation_logged_to_a_local_mlflow_store(tmp_path):
    from mlflow.tracking import MlflowClient

    cfg = load_config(None, [f"output_dir={tmp_path}", "name=exp", "eval.tracking.kind=mlflow"])
    table = tmp_path / "results.md"
    table.write_text("| task | score |\n")
    result = {
        "scores": {"STSB": 0.61, "TREC": 0.43, "Broken": None},
        "mean_by_type": {"STS": 0.61, "Classification": 0.43},
        "mean_main_score": 0.52,
        "files": {"markdown": str(table)},
    }
    with tracked(cfg, "eval") as tracker:
        log_evaluation(tracker, cfg, result)
        run_id = tracker.run_id
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlruns' / 'mlflow.db'}")
    run = client.get_run(run_id)
    assert run.info.run_name == "exp-eval" and run.info.status == "FINISHED"
    assert run.data.metrics == {
        "score.STSB": 0.61,
        "score.TREC": 0.43,
        "mean.STS": 0.61,
        "mean.Classification": 0.43,
        "mean_main_score": 0.52,
    }
    assert run.data.params["eval.suite"] == "offline"
    paths = {a.path for a in client.list_artifacts(run_id)}
    assert {"eval", "scores.json"} <= paths
    local = client.download_artifacts(run_id, "scores.json", str(tmp_path / "dl"))
    rows = json.loads(open(local).read())["rows"]
    assert {"task": "STSB", "main_score": 0.61} in rows
    # the artifacts stay beside the store, not in the working directory
    assert (tmp_path / "mlruns" / "artifacts").is_dir()


def test_wandb_missing_is_a_clear_error(tmp_path, monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_wandb(name, *a, **kw):
        if name == "wandb":
            raise ImportError("no wandb")
        return real_import(name, *a, **kw)

    monkeypatch.setattr(builtins, "__import__", no_wandb)
    cfg = load_config(None, [f"output_dir={tmp_path}", "train.tracking.kind=wandb"])
    with pytest.raises(ConfigError, match="pip install wandb"):
        with tracked(cfg, "train"):
            pass
