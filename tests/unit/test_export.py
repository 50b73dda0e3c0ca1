"""``l2vg export``: a trained encoder as a sentence-transformers folder, equal to ``encode``."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from l2vg_ray.config import ModelConfig
from l2vg_ray.eval.adapter import InstructionSet
from l2vg_ray.export import export_sentence_transformers
from l2vg_ray.method import L2VGEncoder

TEXTS = ["Why is the sky blue?", "Who wrote Hamlet? A longer question to pad the batch."]


@pytest.fixture(scope="module")
def trained(tiny_llm_dir):
    enc = L2VGEncoder.from_config(
        ModelConfig(llm=str(tiny_llm_dir), teacher="tiny", n_thought=2, n_compression=3,
                    max_length=32, device="cpu"), teacher_dim=8)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():  # "trained" values: every tensor differs from its start
        for p in enc.trainable_parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.1)
    return enc


def test_export_loads_in_sentence_transformers_and_equals_encode(trained, tiny_llm_dir, tmp_path):
    from sentence_transformers import SentenceTransformer

    paper = InstructionSet.named("paper")
    out = export_sentence_transformers(trained, tmp_path / "st", llm_dir=tiny_llm_dir,
                                       instructions=paper, name="tiny-l2vg")
    files = {p.name for p in out.iterdir()}
    assert {"modules.json", "config_sentence_transformers.json", "modeling_l2vg.py",
            "l2vg_trainable.safetensors", "llm", "README.md", "l2vg_config.json"} <= files
    st = SentenceTransformer(str(out), trust_remote_code=True, device="cpu")
    assert st.get_embedding_dimension() == 8
    got = st.encode(TEXTS, batch_size=2, convert_to_numpy=True)
    np.testing.assert_allclose(got, trained.encode(TEXTS), atol=1e-5)
    # Task prompts: the paper's STS instruction, as encode(instruction=...) composes it.
    sts = paper.for_task("STSBenchmark", "STS")
    got = st.encode(TEXTS, prompt_name="STSBenchmark", convert_to_numpy=True)
    np.testing.assert_allclose(got, trained.encode(TEXTS, instruction=sts), atol=1e-5)
    got = st.encode(TEXTS, prompt_name="document", normalize_embeddings=True, convert_to_numpy=True)
    want = trained.encode(TEXTS, instruction=paper.document, normalize=True)
    np.testing.assert_allclose(got, want, atol=1e-5)
    prompts = json.loads((out / "config_sentence_transformers.json").read_text())["prompts"]
    assert prompts["STS"] == "Generate text that is semantically similar to this text: "
    # The folder is also an l2vg-ray encoder folder.
    back = L2VGEncoder.load(out, device="cpu")
    assert back.fingerprint() == trained.fingerprint()


def test_export_refuses_a_non_empty_folder(trained, tiny_llm_dir, tmp_path):
    (tmp_path / "st").mkdir()
    (tmp_path / "st" / "keep.txt").write_text("x")
    with pytest.raises(FileExistsError, match="--overwrite"):
        export_sentence_transformers(trained, tmp_path / "st", llm_dir=tiny_llm_dir,
                                     instructions=InstructionSet.none(), name="x")
    assert (tmp_path / "st" / "keep.txt").exists()


def test_mteb_model_meta_is_complete_and_rebuilds_the_encoder(trained, tmp_path, tiny_config):
    from l2vg_ray.eval.adapter import MTEBEncoder

    folder = tmp_path / "enc"
    trained.save(folder)
    tiny_config.cache_dir = str(tmp_path / "cache")
    model = MTEBEncoder(trained, instructions=InstructionSet.named("paper"), spec=str(folder))
    meta = model.mteb_model_meta
    assert meta.embed_dim == 8 and meta.max_tokens == 32 and meta.n_parameters > 1000
    assert meta.revision.startswith(trained.fingerprint()) and meta.reference
    rebuilt = meta.load_model(device="cpu")
    assert rebuilt.encoder.fingerprint() == trained.fingerprint()
    assert rebuilt.instructions.name == "paper"
    np.testing.assert_allclose(rebuilt.encoder.encode(TEXTS), trained.encode(TEXTS), atol=1e-6)


def test_model_card_names_the_teacher_the_targets_came_from(trained):
    from l2vg_ray.export import model_card

    card = model_card(trained, name="x", recipe=None, prompts={})
    assert "| teacher | `tiny` (8 dims) |" in card  # no recipe: the config's label
    recipe = {"config": "c.yaml", "data": {"teacher_model": "mean-pooled-llm:tiny-llm"}}
    card = model_card(trained, name="x", recipe=recipe, prompts={})
    assert "| teacher | `mean-pooled-llm:tiny-llm` (8 dims) |" in card and "`tiny`" not in card
