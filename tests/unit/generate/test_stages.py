"""The generation job's Ray Data stages without Ray: columns in and out, typed constructor
arguments, required-column checks, and the map_batches plan (actor pools, resources)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from l2vg_ray import schema
from l2vg_ray.config import ConfigError, GenerateConfig, ModelConfig
from l2vg_ray.generate.stages import (
    GenerateStage,
    TeacherStage,
    generate_stage_kwargs,
    teacher_stage_kwargs,
)
from l2vg_ray.generate.teacher import TeacherSpec, teacher_dim
from l2vg_ray.testing import TINY_QUERIES

TEXTS = ["Paris is the capital of France.", "Two plus two is four.", "", "The sea is wide."]


@pytest.fixture
def gen_config(tiny_config, tiny_generator_llm_dir):
    tiny_config.model.llm = str(tiny_generator_llm_dir)
    tiny_config.generate.max_tokens = 8
    return tiny_config


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
    assert set(kw) == {"fn_constructor_kwargs", "compute", "num_cpus", "num_gpus", "batch_size",
                       "max_restarts"}
    assert kw["max_restarts"] == 0  # no constructor-in-object-store error line; reruns resume
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


def test_teacher_stage_gives_float32_rows(tiny_config):
    stage = TeacherStage(**teacher_stage_kwargs(tiny_config)["fn_constructor_kwargs"])
    batch = {
        schema.ID: np.array(["a", "b", "c", "d"], dtype=object),
        schema.RESPONSE: np.array(TEXTS, dtype=object),
    }
    out = stage(batch)
    emb = out[schema.TEACHER_EMBEDDING]
    assert emb.dtype == np.float32 and emb.shape == (4, 32) == (4, teacher_dim(tiny_config))
    assert np.isfinite(emb).all() and not np.allclose(emb[0], emb[1])
    assert set(out[schema.TEACHER_MODEL]) == {tiny_config.model.teacher}
    assert list(out[schema.ID]) == ["a", "b", "c", "d"]
    # A row's embedding does not depend on the batch it came in.
    np.testing.assert_allclose(stage.teacher.embed([TEXTS[1]])[0], emb[1], atol=1e-5)
    with pytest.raises(ValueError, match=r"TeacherStage needs columns \['response'\]"):
        stage({schema.QUERY: np.array(TINY_QUERIES[:2], dtype=object)})


def test_teacher_stage_kwargs_describe_the_actor_pool(tiny_config):
    import ray.data

    tiny_config.teacher.num_actors = 2
    tiny_config.teacher.num_gpus_per_actor = 0.5
    kw = teacher_stage_kwargs(tiny_config)
    assert isinstance(kw["compute"], ray.data.ActorPoolStrategy)
    assert (kw["compute"].min_size, kw["compute"].max_size) == (2, 2)
    assert (kw["num_cpus"], kw["num_gpus"], kw["batch_size"]) == (1.0, 0.5, 4)
    spec = kw["fn_constructor_kwargs"]["spec"]
    assert isinstance(spec, TeacherSpec) and spec.teacher.num_actors == 2  # typed, resolved
    tiny_config.teacher.batch_size = 0
    with pytest.raises(ConfigError, match="teacher.batch_size=0"):
        teacher_stage_kwargs(tiny_config)


def test_stages_refuse_untyped_constructor_arguments(tiny_config):
    from l2vg_ray.config import to_dict

    plain = to_dict(tiny_config)
    with pytest.raises(TypeError, match=r"GenerateStage takes generate: GenerateConfig, got dict"):
        GenerateStage(model=ModelConfig(), generate=plain["generate"], cache_dir="x")
    with pytest.raises(TypeError, match=r"TeacherStage takes spec: TeacherSpec, got DictConfig"):
        TeacherStage(tiny_config)


def test_what_travels_to_the_actors_is_small(tiny_config):
    """Ray Data ray.puts each stage with its constructor arguments: they must stay the typed
    sections (a few KB), never the rows or anything that grows with the data."""
    from ray import cloudpickle

    for kw in (generate_stage_kwargs(tiny_config), teacher_stage_kwargs(tiny_config)):
        assert len(cloudpickle.dumps(kw["fn_constructor_kwargs"])) < 20_000
