"""evaluate_task, the per-task core: a trained encoder whose texts are all cached is never loaded."""

from __future__ import annotations

import dataclasses

import pytest


def test_fully_cached_task_does_not_load_the_model(tiny_config, tmp_path, monkeypatch):
    import l2vg_ray.loading
    from l2vg_ray.config import typed
    from l2vg_ray.eval import runner, worker
    from l2vg_ray.eval.tasks.synthetic import write_synthetic_offline_data
    from l2vg_ray.method import L2VGEncoder

    model = dataclasses.replace(typed(tiny_config).model, device="cpu")
    L2VGEncoder.from_config(model, teacher_dim=8).save(tmp_path / "enc")
    tiny_config.eval.model = str(tmp_path / "enc")
    tiny_config.eval.overwrite = True  # score again, from the embedding cache
    tiny_config.eval.max_docs = 20
    data = write_synthetic_offline_data(tiny_config.cache_dir)
    (job,) = runner.make_jobs(tiny_config, ["OfflineSTSBenchmark"], data_dir=str(data))

    worker.release()
    first = runner.evaluate_task(job)
    assert first["model_loaded"] and first["n_encoded"] > 0 and first["model_loads"] == 1
    again = runner.evaluate_task(job)  # the same worker process holds the model
    assert again["model_loads"] == 0 and again["main_score"] == pytest.approx(first["main_score"])

    worker.release()  # a fresh worker process

    def no_load(*args, **kwargs):
        raise AssertionError("the model was loaded although every text is cached")

    monkeypatch.setattr(l2vg_ray.loading, "load_encoder", no_load)
    second = runner.evaluate_task(job)
    assert not second["model_loaded"] and second["model_loads"] == 0
    assert second["n_encoded"] == 0 and second["n_cached"] == first["n_encoded"] + first["n_cached"]
    assert second["main_score"] == pytest.approx(first["main_score"])
    assert second["fingerprint"] == first["fingerprint"]
    worker.release()


def test_a_suite_whose_data_is_all_missing_is_reported_without_ray(tiny_config, tmp_path, monkeypatch):
    """No task has its data: no Ray task starts, and the table names each task with its fix."""
    import l2vg_ray.eval.tasks.data as data
    from l2vg_ray.eval import runner

    def nothing(cache_dir, names=None):
        return data.PreparedData(tmp_path, {n: data.MissingData(n, "pkg==1", "gone.", "place it.")
                                            for n in names})

    monkeypatch.setattr(data, "prepare_offline_data", nothing)
    tiny_config.eval.model = "teacher"
    tiny_config.eval.suite = "list"
    tiny_config.eval.tasks = ["OfflineSTSBenchmark", "OfflineTRECClustering"]
    tiny_config.eval.output_dir = str(tmp_path / "eval")
    result = runner.run_eval(tiny_config)
    assert result["n_tasks"] == result["n_missing"] == 2 and result["n_ok"] == 0
    assert set(result["missing"]) == {"OfflineSTSBenchmark", "OfflineTRECClustering"}
    assert result["scores"] == {"OfflineSTSBenchmark": None, "OfflineTRECClustering": None}
