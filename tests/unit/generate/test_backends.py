"""Generation backends without Ray: chat prompts, greedy determinism, the stage and its plan."""

from __future__ import annotations

import json

import numpy as np
import pytest

from l2vg_ray import schema
from l2vg_ray.config import ConfigError, GenerateConfig, ModelConfig, QueryConfig
from l2vg_ray.generate import backends
from l2vg_ray.generate.backends import (
    GENERATION_BACKENDS,
    GenerateStage,
    Generation,
    TransformersBackend,
    build_chat_prompts,
    decode_generation,
    generate_stage_kwargs,
    resolve_backend,
    stop_token_ids,
)
from l2vg_ray.testing import TINY_QUERIES
from l2vg_ray.torch_utils import load_tokenizer


@pytest.fixture(scope="module")
def greedy_backend(tiny_generator_llm_dir):
    return TransformersBackend(
        str(tiny_generator_llm_dir), gen=GenerateConfig(max_tokens=10), dtype="float32", device="cpu"
    )


@pytest.fixture
def gen_config(tiny_config, tiny_generator_llm_dir):
    tiny_config.model.llm = str(tiny_generator_llm_dir)
    tiny_config.generate.max_tokens = 8
    return tiny_config


def test_chat_template_wraps_each_query_as_a_user_turn(tiny_llm_dir):
    tok = load_tokenizer(str(tiny_llm_dir))
    prompts = build_chat_prompts(tok, ["Hi there", "Why?"], None)
    assert prompts == [
        "<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\n",
        "<|im_start|>user\nWhy?<|im_end|>\n<|im_start|>assistant\n",
    ]
    with_system = build_chat_prompts(tok, ["Hi there"], "Be brief.")
    assert with_system[0].startswith("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n")


THINKING_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}"
    "<|im_end|>\n{% endfor %}<|im_start|>assistant\n"
    "{% if enable_thinking is defined and not enable_thinking %}<think></think>{% endif %}"
)


def test_chat_template_kwargs_reach_the_template_in_both_engines(tiny_generator_llm_dir):
    tok = load_tokenizer(str(tiny_generator_llm_dir))
    tok.chat_template = THINKING_TEMPLATE
    plain = build_chat_prompts(tok, ["Hi"], None)
    off = build_chat_prompts(tok, ["Hi"], None, {"enable_thinking": False})
    assert not plain[0].endswith("<think></think>") and off[0].endswith("<think></think>")
    # Both engines build their prompts through build_chat_prompts with the settings' kwargs.
    settings = backends.GenerationSettings.from_config(
        GenerateConfig(chat_template_kwargs={"enable_thinking": False})
    )
    assert settings.template_kwargs == {"enable_thinking": False}
    assert json.loads(settings.to_json())["chat_template_kwargs"] == {"enable_thinking": False}
    backend = TransformersBackend(
        str(tiny_generator_llm_dir), gen=GenerateConfig(max_tokens=2, chat_template_kwargs={"enable_thinking": False}),
        device="cpu",
    )
    backend.tokenizer.chat_template = THINKING_TEMPLATE
    seen = []
    real = backends.build_chat_prompts
    try:
        backends.build_chat_prompts = lambda *a: seen.append(a[3]) or real(*a)
        backend.generate(["Hi"])
    finally:
        backends.build_chat_prompts = real
    assert seen == [{"enable_thinking": False}]


def test_default_settings_keep_the_old_sampling_params_json():
    # Data generated before top_k / sampling / chat_template_kwargs existed stays resumable.
    assert json.loads(backends.GenerationSettings().to_json()) == {
        "max_tokens": 256, "seed": 0, "system_prompt": None, "temperature": 0.0, "top_p": 1.0,
    }
    with pytest.raises(ConfigError, match="generate.sampling"):
        backends.GenerationSettings.from_config(GenerateConfig(sampling="auto"))
    with pytest.raises(ConfigError, match="top_k"):
        backends.GenerationSettings.from_config(GenerateConfig(top_k=-1))


def test_model_sampling_uses_the_generation_config_and_explicit_ignores_it(
    tmp_path, tiny_generator_llm_dir, greedy_backend
):
    import shutil

    from transformers import GenerationConfig

    model_dir = tmp_path / "sampling-model"
    shutil.copytree(tiny_generator_llm_dir, model_dir)
    gc = GenerationConfig.from_pretrained(model_dir)
    gc.do_sample, gc.temperature, gc.top_k, gc.top_p = True, 1.5, 50, 1.0
    gc.save_pretrained(model_dir)
    model = TransformersBackend(str(model_dir), gen=GenerateConfig(max_tokens=10, sampling="model", seed=1),
                                device="cpu")
    explicit = TransformersBackend(str(model_dir), gen=GenerateConfig(max_tokens=10), device="cpu")
    first = model.generate(TINY_QUERIES[:4])
    assert model.generate(TINY_QUERIES[:4]) == first  # seeded per call
    assert first != greedy_backend.generate(TINY_QUERIES[:4])  # the file's sampling ran
    # explicit greedy ignores the file's do_sample: identical to the clean greedy engine.
    assert explicit.generate(TINY_QUERIES[:4]) == greedy_backend.generate(TINY_QUERIES[:4])


def test_precomputed_backend_returns_the_sources_responses(tmp_path, tiny_llm_dir):
    path = tmp_path / "pairs.jsonl"
    rows = [{"question": " What is rain? ", "answer": "Water falling from clouds."},
            {"question": "Who wrote Hamlet?", "answer": "Shakespeare."}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    gen = GenerateConfig(max_tokens=8, response_column="answer",
                         queries=QueryConfig(source="file", path=str(path), column="question"))
    backend = backends.PrecomputedBackend(str(tiny_llm_dir), gen=gen, cache_dir=str(tmp_path))
    out = backend.generate(["Who wrote Hamlet?", "What is rain?"])
    assert [g.text for g in out] == ["Shakespeare.", "Water falling from clouds."]
    assert all(g.n_tokens > 0 for g in out)
    with pytest.raises(ValueError, match="no precomputed response"):
        backend.generate(["Something else?"])
    gen.response_column = "response"
    with pytest.raises(ValueError, match=r"no column\(s\) \['response'\]"):
        backends.PrecomputedBackend(str(tiny_llm_dir), gen=gen, cache_dir=str(tmp_path))


def test_a_tokenizer_without_chat_template_is_refused(tiny_llm_dir):
    tok = load_tokenizer(str(tiny_llm_dir))
    tok.chat_template = None
    with pytest.raises(ValueError, match="no chat template"):
        build_chat_prompts(tok, ["Hi"], None)


def test_decode_cuts_at_the_first_stop_token_and_strips(tiny_llm_dir):
    tok = load_tokenizer(str(tiny_llm_dir))
    stops = stop_token_ids(tok, str(tiny_llm_dir))
    assert stops == [tok.eos_token_id]
    ids = tok(" Paris is nice", add_special_tokens=False)["input_ids"]
    g = decode_generation(tok, [*ids, tok.eos_token_id, *ids], stops)
    assert g == Generation("Paris is nice", len(ids), tuple(ids))
    assert decode_generation(tok, [tok.eos_token_id], stops) == Generation("", 0, ())


def test_greedy_is_deterministic_and_batch_size_invariant(greedy_backend):
    full = greedy_backend.generate(TINY_QUERIES)
    assert len(full) == len(TINY_QUERIES)
    assert len({g.text for g in full}) > len(TINY_QUERIES) // 2, "greedy texts should vary"
    assert all(0 < g.n_tokens <= 10 and len(g.token_ids) == g.n_tokens for g in full)
    assert greedy_backend.generate(TINY_QUERIES) == full
    # Batches of 1 (no padding) and of 5 (different padding) give the same tokens.
    for bs in (1, 5):
        chunked = [
            g
            for i in range(0, len(TINY_QUERIES), bs)
            for g in greedy_backend.generate(TINY_QUERIES[i : i + bs])
        ]
        assert chunked == full
    assert greedy_backend.generate([]) == []


def test_seeded_sampling_repeats_and_differs_from_greedy(tiny_generator_llm_dir, greedy_backend):
    gen = GenerateConfig(max_tokens=10, temperature=1.0, top_p=0.9, seed=3)
    sampler = TransformersBackend(str(tiny_generator_llm_dir), gen=gen, device="cpu")
    first = sampler.generate(TINY_QUERIES[:4])
    assert sampler.generate(TINY_QUERIES[:4]) == first
    assert first != greedy_backend.generate(TINY_QUERIES[:4])


def test_generate_stage_adds_the_generation_columns(gen_config):
    stage = GenerateStage(**generate_stage_kwargs(gen_config)["fn_constructor_kwargs"])
    queries = TINY_QUERIES[:3]
    ids = [schema.query_id(q) for q in queries]
    out = stage(
        {schema.ID: np.array(ids, dtype=object), schema.QUERY: np.array(queries, dtype=object)}
    )
    assert list(out[schema.ID]) == ids and list(out[schema.QUERY]) == queries
    assert out[schema.RESPONSE].shape == (3,) and all(
        isinstance(r, str) for r in out[schema.RESPONSE]
    )
    assert out[schema.RESPONSE_TOKENS].dtype == np.int32
    assert set(out[schema.GENERATOR_MODEL]) == {gen_config.model.llm}
    params = json.loads(out[schema.SAMPLING_PARAMS][0])
    assert params == {
        "max_tokens": 8,
        "seed": 0,
        "system_prompt": None,
        "temperature": 0.0,
        "top_p": 1.0,
    }
    with pytest.raises(
        ValueError, match=r"GenerateStage needs columns \['query'\].*lacks \['query'\]"
    ):
        stage({schema.ID: np.array(ids, dtype=object), "text": np.array(queries, dtype=object)})


def test_generate_stage_kwargs_describe_the_actor_pool(tiny_config):
    import ray.data

    tiny_config.generate.num_actors = 3
    tiny_config.generate.num_cpus_per_actor = 2.0
    tiny_config.generate.num_gpus_per_actor = 1.0
    kw = generate_stage_kwargs(tiny_config)
    assert set(kw) == {"fn_constructor_kwargs", "compute", "num_cpus", "num_gpus", "batch_size"}
    assert isinstance(kw["compute"], ray.data.ActorPoolStrategy)
    assert (kw["compute"].min_size, kw["compute"].max_size) == (3, 3)
    assert (kw["num_cpus"], kw["num_gpus"], kw["batch_size"]) == (2.0, 1.0, 4)
    ctor = kw["fn_constructor_kwargs"]
    assert set(ctor) == {"model", "generate", "cache_dir"}
    assert isinstance(ctor["generate"], GenerateConfig) and isinstance(ctor["model"], ModelConfig)
    assert ctor["generate"].output_dir.endswith("out/data")  # typed and resolved

    tiny_config.generate.memory_gb_per_actor = 1.5  # reserved with Ray, in bytes
    assert generate_stage_kwargs(tiny_config)["memory"] == int(1.5 * 2**30)
    tiny_config.generate.memory_gb_per_actor = 0.0
    with pytest.raises(ConfigError, match="memory_gb_per_actor=0"):
        generate_stage_kwargs(tiny_config)
    tiny_config.generate.memory_gb_per_actor = None

    assert kw["compute"].max_concurrent_calls_per_actor is None  # one call at a time
    tiny_config.generate.max_concurrent_batches = 3  # three calls share each actor's engine
    pool = generate_stage_kwargs(tiny_config)["compute"]
    assert (pool.max_concurrent_calls_per_actor, pool.max_tasks_in_flight_per_actor) == (3, 4)
    assert pool.enable_true_multi_threading
    tiny_config.generate.max_concurrent_batches = 0
    with pytest.raises(ConfigError, match="max_concurrent_batches=0"):
        generate_stage_kwargs(tiny_config)
    tiny_config.generate.max_concurrent_batches = 1

    tiny_config.generate.tensor_parallel_size = 2
    with pytest.raises(ConfigError, match="num_gpus_per_actor=2"):
        generate_stage_kwargs(tiny_config)


def test_backend_names_resolve_and_unknown_ones_list_the_known(monkeypatch):
    assert GENERATION_BACKENDS.names() == ["precomputed", "transformers", "vllm"]
    assert resolve_backend("transformers") == "transformers"
    with pytest.raises(
        ValueError, match="Unknown generation backend 'vlm'. Known: precomputed, transformers, vllm"
    ):
        resolve_backend("vlm")
    monkeypatch.setattr(backends, "vllm_platform", lambda: None)
    assert resolve_backend("auto") == "transformers"
    monkeypatch.setattr(backends, "vllm_platform", lambda: "cpu")
    assert resolve_backend("auto") == "vllm"


def test_vllm_backend_without_vllm_says_how_to_install(tiny_llm_dir, monkeypatch):
    monkeypatch.setattr(backends, "vllm_platform", lambda: None)
    with pytest.raises(ConfigError, match="make vllm-env"):
        backends.VLLMBackend(str(tiny_llm_dir), gen=GenerateConfig())


def test_bad_sampling_settings_are_config_errors():
    with pytest.raises(ConfigError, match="top_p"):
        backends.GenerationSettings.from_config(GenerateConfig(top_p=0))
    with pytest.raises(ConfigError, match="temperature"):
        backends.GenerationSettings.from_config(GenerateConfig(temperature=-1))


def test_importing_the_stage_modules_pulls_no_engine():
    import subprocess
    import sys

    code = (
        "import sys, l2vg_ray.generate, l2vg_ray.generate.backends, l2vg_ray.generate.teacher; "
        "print(sorted(m for m in ('torch', 'transformers', 'vllm', 'ray', 'sentence_transformers') "
        "if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_generation_actors_can_run_in_another_interpreter(tiny_config, tmp_path, monkeypatch):
    python = tmp_path / "venv" / "bin" / "python"
    python.parent.mkdir(parents=True)
    python.write_text("")
    tiny_config.generate.python = str(python)
    kw = generate_stage_kwargs(tiny_config)
    assert kw["runtime_env"] == {"py_executable": str(python)}
    tiny_config.generate.python = None
    assert "runtime_env" not in generate_stage_kwargs(tiny_config)
    tiny_config.generate.python = str(tmp_path / "missing")
    with pytest.raises(ConfigError, match="make vllm-env"):
        generate_stage_kwargs(tiny_config)
    # auto: the vLLM venv when it exists (relative to the working directory), else the driver's.
    monkeypatch.chdir(tmp_path)
    tiny_config.generate.python = "auto"
    assert "runtime_env" not in generate_stage_kwargs(tiny_config)
    (tmp_path / ".venv-vllm" / "bin").mkdir(parents=True)
    (tmp_path / ".venv-vllm" / "bin" / "python").write_text("")
    assert generate_stage_kwargs(tiny_config)["runtime_env"] == {
        "py_executable": str(tmp_path / ".venv-vllm" / "bin" / "python")}


def test_needed_model_len_bounds_the_longest_prompt_of_the_run(tiny_generator_llm_dir):
    from l2vg_ray.config import QuerySource
    from l2vg_ray.generate.backends import encode_prompts, needed_model_len

    tok = load_tokenizer(str(tiny_generator_llm_dir))
    gen = GenerateConfig(max_tokens=16, queries=QueryConfig(max_query_tokens=12))
    longest = " ".join(["water"] * 40)
    ids = tok(longest, add_special_tokens=False)["input_ids"][:12]
    query = tok.decode(ids)  # a query of (about) the most tokens the run keeps
    prompt = encode_prompts(tok, build_chat_prompts(tok, [query], None))[0]
    need = needed_model_len(tok, gen)
    assert len(prompt) + gen.max_tokens <= need <= len(prompt) + gen.max_tokens + 16
    # A mix's longest part decides; a system prompt adds its tokens.
    gen.queries.parts = [QuerySource(max_query_tokens=50)]
    assert needed_model_len(tok, gen) == need + 38
    gen.system_prompt = "You are a helpful assistant who answers briefly."
    assert needed_model_len(tok, gen) > need + 38
