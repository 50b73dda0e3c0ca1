"""What eval's Ray tasks and encoder actors ask Ray for: eval.resources_per_task reaches the
options of every task (scoring, shards) and actor, and only when it is set. No Ray cluster: the
options are checked by Ray's own validation (``.options`` starts nothing) and fan_out is faked."""

from __future__ import annotations

from l2vg_ray.config import load_config, typed


def job(*overrides: str):
    from l2vg_ray.eval.worker import TaskJob

    return TaskJob(task="OfflineSQuADRetrieval", cfg=typed(load_config(None, list(overrides))))


def test_task_resources_carry_the_custom_resources_in_both_shapes():
    assert job().task_resources == {"num_cpus": 1.0, "num_gpus": 0.0}  # none asked: no key
    assert job("eval.num_cpus_per_task=2", "eval.num_gpus_per_task=1",
               "eval.resources_per_task.eval_slot=1").task_resources == {
        "num_cpus": 2.0, "num_gpus": 1.0, "resources": {"eval_slot": 1.0}}
    # with encoder actors the scoring tasks need no GPU, but still land on the eval node type
    assert job("eval.encoders=2", "eval.scoring_cpus=0.5", "eval.num_gpus_per_task=1",
               "eval.resources_per_task={eval_slot: 1, big_mem: 0.5}").task_resources == {
        "num_cpus": 0.5, "num_gpus": 0.0, "resources": {"eval_slot": 1.0, "big_mem": 0.5}}


def test_task_and_actor_options_pass_ray_validation():
    import ray

    from l2vg_ray.eval.fanout import task_options
    from l2vg_ray.eval.service import EncoderServer, actor_options

    def score(x):
        return x

    plain = task_options(score, num_cpus=1.0, num_gpus=0.0, max_retries=1, resources={})
    assert "resources" not in plain and plain["name"] == "eval:score"
    opts = task_options(score, max_retries=0, **job("eval.resources_per_task.eval_slot=1").task_resources)
    assert opts["resources"] == {"eval_slot": 1.0} and opts["retry_exceptions"] is False
    ray.remote(score).options(**opts)  # Ray's option validation (refuses e.g. resources={"CPU": 1})

    assert "resources" not in actor_options(job())
    actor = actor_options(job("eval.encoders=1", "eval.num_cpus_per_task=2",
                              "eval.resources_per_task.eval_slot=1"))
    assert actor == {"num_cpus": 2.0, "num_gpus": 0.0, "resources": {"eval_slot": 1.0},
                     "max_restarts": 1, "max_task_retries": 1}
    ray.remote(EncoderServer).options(**actor)


def test_scoring_tasks_and_corpus_shards_ask_for_the_custom_resources(monkeypatch, tmp_path):
    """_run_jobs: the shard planning task and the scoring tasks get the same resources."""
    import l2vg_ray.eval.fanout as fanout
    from l2vg_ray.eval import runner

    calls = []

    def fake_fan_out(fn, jobs, *, keys, **kwargs):
        calls.append((fn.__name__, kwargs))
        return [fanout.Outcome(k, fn.__name__ == "count_corpus", value=0, error="x") for k in keys]

    monkeypatch.setattr(fanout, "fan_out", fake_fan_out)
    cfg = load_config(None, [f"output_dir={tmp_path}", "eval.shard_min_docs=1", "eval.shards=2",
                             "eval.resources_per_task.eval_slot=1"])
    rows, loads = runner._run_jobs(runner.make_jobs(cfg, ["OfflineSQuADRetrieval"], data_dir=None))
    assert [name for name, _ in calls] == ["count_corpus", "evaluate_task"]
    for _, kwargs in calls:
        assert kwargs["resources"] == {"eval_slot": 1.0} and kwargs["num_cpus"] == 1.0
    assert rows[0]["status"] == "failed" and loads == 0

