"""Within-task sharding: corpus slices cover the corpus; a task scored after its shards filled
the cache gives exactly the unsharded scores, with every document a cache hit."""

from __future__ import annotations

import dataclasses

import pytest


def test_shard_slices_cover_the_texts_once():
    from l2vg_ray.eval.shard import shard_slice

    texts = [f"t{i}" for i in range(11)]
    for count in (1, 2, 3, 11, 12):
        parts = [shard_slice(texts, i, count) for i in range(count)]
        assert [t for p in parts for t in p] == texts
        assert max(map(len, parts)) - min(map(len, parts)) <= 1
    with pytest.raises(ValueError, match="outside 0..1"):
        shard_slice(texts, 2, 2)


@pytest.fixture
def squad_job(tiny_config):
    from l2vg_ray.eval import runner, worker
    from l2vg_ray.eval.tasks.synthetic import write_synthetic_offline_data

    tiny_config.eval.model = "teacher"
    tiny_config.eval.max_docs = 20
    tiny_config.eval.batch_size = 1  # batch-invariant encoding: scores comparable exactly
    data = write_synthetic_offline_data(tiny_config.cache_dir)
    (job,) = runner.make_jobs(tiny_config, ["OfflineSQuADRetrieval"], data_dir=str(data))
    worker.release()
    yield job
    worker.release()


def test_corpus_texts_are_what_mteb_encodes(squad_job):
    from l2vg_ray.eval.adapter import InstructionSet
    from l2vg_ray.eval.shard import _loaded_task, corpus_texts

    task = _loaded_task(squad_job)
    corpus = task.dataset["default"]["test"]["corpus"]
    ((instruction, texts),) = corpus_texts(task, InstructionSet.named("project"))
    assert instruction is None  # the project set gives documents no instruction
    joined = (f"{t} {d}".strip() for t, d in zip(corpus["title"], corpus["text"], strict=True))
    assert texts == list(dict.fromkeys(joined))
    ((instruction, _),) = corpus_texts(task, InstructionSet.named("paper"))
    assert instruction == InstructionSet.named("paper").document


def test_sharded_scores_equal_unsharded(squad_job, tmp_path):
    from l2vg_ray.eval import runner, worker
    from l2vg_ray.eval.shard import ShardJob, count_corpus, embed_shard

    plain = runner.evaluate_task(squad_job)
    worker.release()
    e = dataclasses.replace(squad_job.eval, cache_dir=str(tmp_path / "cache2"),
                            output_dir=str(tmp_path / "results2"))
    job = dataclasses.replace(squad_job, cfg=dataclasses.replace(squad_job.cfg, eval=e))
    n_docs = count_corpus(job)
    encoded = []
    for i in range(3):
        worker.release()  # each shard in its own worker process
        encoded.append(embed_shard(ShardJob(job, i, 3)))
    assert sum(encoded) == n_docs and min(encoded) > 0
    worker.release()
    sharded = runner.evaluate_task(job)
    assert sharded["scores"] == plain["scores"]
    assert sharded["main_score"] == plain["main_score"]
    # Every document came from the shards' cache entries: the task encoded its queries only.
    assert sharded["n_encoded"] == plain["n_encoded"] - n_docs
    assert sharded["n_cached"] == plain["n_cached"] + n_docs
