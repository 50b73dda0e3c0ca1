"""`l2vg llm2vec` on Ray Train with the tiny LLM: both steps run on two workers, the result names
the teacher section, the output loads through teacher.kind=llm2vec, and a rerun trains nothing."""

from __future__ import annotations

import json

import numpy as np
import pytest

from l2vg_ray.cli import main
from l2vg_ray.config import load_config


@pytest.mark.usefixtures("ray_session")
def test_llm2vec_command_builds_a_loadable_teacher(tmp_path, tiny_llm_dir, tiny_queries_file):
    from l2vg_ray.generate.teacher import build_teacher

    out = tmp_path / "llm2vec"
    overrides = [
        f"cache_dir={tmp_path / 'cache'}", f"llm2vec.llm={tiny_llm_dir}",
        f"llm2vec.output_dir={out}", "llm2vec.corpus.source=file",
        f"llm2vec.corpus.path={tiny_queries_file}", "llm2vec.corpus.max_words=null",
        "llm2vec.corpus.limit=null", "llm2vec.max_length=24", "llm2vec.lora_r=4",
        "llm2vec.lora_alpha=8", "llm2vec.mntp.steps=3", "llm2vec.mntp.batch_size=4",
        "llm2vec.simcse.steps=2", "llm2vec.simcse.batch_size=4", "llm2vec.num_workers=2",
        "llm2vec.cpus_per_worker=1", "llm2vec.warmup_steps=1", f"output_dir={tmp_path}",
    ]
    assert main(["llm2vec", *overrides]) == 0
    result = json.loads((out / "llm2vec_result.json").read_text())
    assert set(result["seconds"]) == {"mntp", "simcse"}
    assert all(np.isfinite(v) for v in result["final_loss"].values())
    cfg = load_config(None, [f"model.llm={tiny_llm_dir}", "teacher.kind=llm2vec",
                             f"teacher.model={result['teacher']['model']}",
                             f"teacher.adapter={result['teacher']['adapter']}"])
    emb = build_teacher(cfg).embed(["a text", "another text"])
    assert emb.shape == (2, 64) and np.isfinite(emb).all()

    assert main(["llm2vec", *overrides]) == 0  # both steps done: nothing trains again
    again = json.loads((out / "llm2vec_result.json").read_text())
    assert again["seconds"] == {}
