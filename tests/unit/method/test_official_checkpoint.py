"""Published LLM2Vec-Gen checkpoints (the official on-disk layout) load into L2VGEncoder."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from l2vg_ray.method.official import is_official_layout, load_official

TEXTS = ["Why is the sky blue?", "Who wrote Hamlet? Tell me more."]


@pytest.fixture(scope="module")
def official_dir(tmp_path_factory, tiny_llm_dir):
    from l2vg_ray.testing import build_tiny_official_checkpoint

    return build_tiny_official_checkpoint(
        tiny_llm_dir, tmp_path_factory.mktemp("official") / "LLM2Vec-Gen-tiny",
        n_special=4, n_compression=2, teacher_dim=32,
    )


def _direct(official_dir, tiny_llm_dir):
    """The official computation, by hand: tokenizer with <questionK>, the TrainableTokens
    adapter on the base model, the two Linear heads, mean over the last n tokens."""
    from peft import PeftModel
    from transformers import AutoModel, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(official_dir))
    base = AutoModel.from_pretrained(str(tiny_llm_dir))
    base.resize_token_embeddings(len(tok))
    enc = PeftModel.from_pretrained(base, str(official_dir / "encoder")).eval()
    heads = {n: torch.load(official_dir / n, weights_only=True)["state_dict"]
             for n in ("reconstruction_mlp", "alignment_mlp")}

    def lin(name, x):
        sd = heads[name]
        return x @ sd["projection.weight"].T + sd["projection.bias"]

    special = "".join(f"<question{i}>" for i in range(1, 5))
    out, soft = [], []
    for text in TEXTS:
        ids = tok(text + special, return_tensors="pt")
        with torch.no_grad():
            h = enc(**ids).last_hidden_state[:, -2:]
        s = lin("reconstruction_mlp", h)
        soft.append(s)
        out.append(lin("alignment_mlp", s).mean(1)[0])
    return torch.stack(out).numpy(), soft


def test_layout_is_detected(official_dir, tiny_llm_dir):
    assert is_official_layout(official_dir)
    assert not is_official_layout(tiny_llm_dir)


def test_encode_equals_the_official_computation(official_dir, tiny_llm_dir, tiny_config):
    from l2vg_ray.loading import load_encoder

    enc = load_encoder(str(official_dir), tiny_config)
    assert (enc.n_thought, enc.n_compression, enc.dim) == (2, 2, 32)
    expected, _ = _direct(official_dir, tiny_llm_dir)
    np.testing.assert_allclose(enc.encode(TEXTS, batch_size=2), expected, atol=1e-5)
    # One text at a time (no padding) gives the same rows.
    np.testing.assert_allclose(enc.encode(TEXTS[:1]), expected[:1], atol=1e-5)


def test_decode_equals_a_greedy_loop_over_the_soft_prompts(official_dir, tiny_llm_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    enc = load_official(str(official_dir), device="cpu")
    _, soft = _direct(official_dir, tiny_llm_dir)
    lm = AutoModelForCausalLM.from_pretrained(str(tiny_llm_dir)).eval()
    tok = AutoTokenizer.from_pretrained(str(tiny_llm_dir))
    decoded = enc.decode(TEXTS, max_new_tokens=6)
    for i, s in enumerate(soft):
        embeds, ids = s, []
        with torch.no_grad():
            for _ in range(6):  # the official generate(): argmax, append, until eos
                nxt = int(lm(inputs_embeds=embeds).logits[0, -1].argmax())
                if nxt == tok.eos_token_id:
                    break
                ids.append(nxt)
                embeds = torch.cat([embeds, lm.get_input_embeddings()(torch.tensor([[nxt]]))], 1)
        assert decoded[i] == tok.decode(ids, skip_special_tokens=True)


def test_not_a_checkpoint_and_offline_hub_ids_are_clear_errors(tmp_path, monkeypatch):
    with pytest.raises(ValueError, match="not a published LLM2Vec-Gen checkpoint"):
        load_official(str(tmp_path))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(RuntimeError, match="needs the Hugging Face hub"):
        load_official("hf:McGill-NLP/LLM2Vec-Gen-Qwen3-8B")
