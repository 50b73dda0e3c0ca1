"""The mteb adapter passes mteb's own mock tasks and the offline task classes (synthetic data)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from l2vg_ray.eval.adapter import InstructionSet, MTEBEncoder
from l2vg_ray.text_encoders import SentenceTransformerEncoder


class Recording:
    """Wraps a TextEncoder and records (instruction, n_texts) of every encode call."""

    def __init__(self, inner):
        self.inner, self.name, self.dim = inner, inner.name, inner.dim
        self.calls: list[tuple[str | None, int]] = []

    def encode(self, texts, *, instruction=None, **kw):
        self.calls.append((instruction, len(texts)))
        return self.inner.encode(texts, instruction=instruction, **kw)

    def fingerprint(self):
        return self.inner.fingerprint()

    def count_tokens(self, texts):
        return self.inner.count_tokens(texts)


@pytest.fixture(scope="module")
def teacher(tiny_teacher_dir):
    return SentenceTransformerEncoder(str(tiny_teacher_dir), device="cpu")


def test_adapter_follows_encoder_protocol(teacher):
    from mteb.models.models_protocols import EncoderProtocol

    model = MTEBEncoder(teacher)
    assert isinstance(model, EncoderProtocol)
    meta = model.mteb_model_meta
    assert meta.name.startswith("l2vg-ray/") and meta.revision == teacher.fingerprint()
    assert meta.embed_dim == teacher.dim
    a = np.eye(3, 4, dtype=np.float32)
    assert np.allclose(np.asarray(model.similarity(a, a)), np.eye(3), atol=1e-6)
    assert np.allclose(np.asarray(model.similarity_pairwise(a, a)), 1.0, atol=1e-6)


def test_mteb_mock_tasks_through_mteb_evaluate(teacher):
    import mteb
    from mteb.mocks import (
        LegacyMockClusteringFastTask,
        MockClassificationTask,
        MockPairClassificationTask,
        MockRerankingTask,
        MockRetrievalTask,
        MockSTSTask,
    )

    rec = Recording(teacher)
    model = MTEBEncoder(rec, instructions=InstructionSet.load())
    tasks = [MockSTSTask(), MockClassificationTask(), LegacyMockClusteringFastTask(),
             MockPairClassificationTask(), MockRerankingTask(), MockRetrievalTask()]
    result = mteb.evaluate(model, tasks, cache=None, show_progress_bar=False, co2_tracker=False)
    scores = {r.task_name: r.get_score() for r in result.task_results}
    assert set(scores) == {t.metadata.name for t in tasks}
    assert all(math.isfinite(s) for s in scores.values()), scores
    used = {i for i, _ in rec.calls}
    inst = InstructionSet.load()
    # Retrieval: queries carry the retrieval instruction, documents none.
    assert inst.by_type["Retrieval"] in used and None in used
    assert inst.by_type["STS"] in used and inst.by_type["Classification"] in used


def test_offline_tasks_load_and_run_on_synthetic_data(tmp_path, teacher):
    import mteb

    from l2vg_ray.eval.tasks.offline import OFFLINE_TASKS, build_offline_task
    from l2vg_ray.eval.tasks.synthetic import write_synthetic_offline_data

    d = write_synthetic_offline_data(tmp_path)
    tasks = [build_offline_task(n, data_dir=d, max_docs=16, seed=0) for n in OFFLINE_TASKS.names()]
    for t in tasks:
        t.load_data()
        assert t.data_loaded
        assert t.metadata.dataset["revision"].endswith("-n16-s0")
    sts = next(t for t in tasks if t.metadata.name == "OfflineSTSBenchmark")
    assert len(sts.dataset["test"]) == 16  # subsampled to max_docs
    qs = next(t for t in tasks if t.metadata.name == "OfflineQuestionSelectionReranking")
    split = qs.dataset["default"]["test"]
    assert len(split["corpus"]) == 4 * (16 // 4) and all(len(v) == 4 for v in split["top_ranked"].values())
    result = mteb.evaluate(MTEBEncoder(teacher), tasks, cache=None, show_progress_bar=False,
                           co2_tracker=False)
    scores = {r.task_name: r.get_score() for r in result.task_results}
    assert sorted(scores) == OFFLINE_TASKS.names()
    assert all(math.isfinite(s) for s in scores.values()), scores


def test_offline_task_without_data_says_how_to_prepare(tmp_path):
    from l2vg_ray.eval.tasks.offline import build_offline_task

    task = build_offline_task("OfflineSTSBenchmark", data_dir=tmp_path, max_docs=50, seed=0)
    with pytest.raises(FileNotFoundError, match="prepare_offline_data"):
        task.load_data()
    with pytest.raises(ValueError, match="max_docs"):
        build_offline_task("OfflineSTSBenchmark", data_dir=tmp_path, max_docs=2, seed=0)
