"""Generation backends without Ray: chat prompts, greedy determinism, sampling settings."""

from __future__ import annotations

import json

import pytest

from l2vg_ray.config import ConfigError, GenerateConfig, QueryConfig
from l2vg_ray.generate import backends
from l2vg_ray.generate.backends import (
    GENERATION_BACKENDS,
    Generation,
    TransformersBackend,
    build_chat_prompts,
    decode_generation,
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
        "import sys, l2vg_ray.generate, l2vg_ray.generate.backends, l2vg_ray.generate.teacher, "
        "l2vg_ray.generate.stages; "
        "print(sorted(m for m in ('torch', 'transformers', 'vllm', 'ray', 'sentence_transformers') "
        "if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


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


def test_vllm_startup_filter_silences_exactly_the_reduce_op_warning():
    import warnings

    reduce_op = ("`torch.distributed.reduce_op` is deprecated, please use "
                 "`torch.distributed.ReduceOp` instead")
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        with backends.vllm_startup_warnings_filtered():
            warnings.warn(reduce_op, FutureWarning, stacklevel=1)
            warnings.warn("another deprecation", FutureWarning, stacklevel=1)
            warnings.warn(reduce_op, UserWarning, stacklevel=1)  # same text, other category
        warnings.warn(reduce_op, FutureWarning, stacklevel=1)  # the filter ends with the start-up
    assert [(str(w.message)[:19], w.category) for w in seen] == [
        ("another deprecation", FutureWarning),
        ("`torch.distributed.", UserWarning),
        ("`torch.distributed.", FutureWarning),
    ]
