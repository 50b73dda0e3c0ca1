"""Teachers without Ray: sentence-transformers and mean-pooled-LLM embeddings, dims."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from l2vg_ray.generate.teacher import (
    TEACHERS,
    build_teacher,
    teacher_dim,
    teacher_spec,
)
from l2vg_ray.torch_utils import mean_pool

TEXTS = ["Paris is the capital of France.", "Two plus two is four.", "", "The sea is wide."]


def test_mean_pool_averages_only_masked_positions():
    hidden = torch.arange(12, dtype=torch.float32).reshape(2, 3, 2)
    mask = torch.tensor([[1, 1, 0], [0, 0, 0]])
    out = mean_pool(hidden, mask)
    assert torch.equal(out, torch.tensor([[1.0, 2.0], [0.0, 0.0]]))


def test_mean_pooled_llm_teacher_pools_response_tokens(tiny_config, tiny_llm_dir):
    tiny_config.teacher.kind = "mean-pooled-llm"
    tiny_config.teacher.batch_size = 2
    assert teacher_spec(tiny_config) == str(tiny_llm_dir)
    teacher = build_teacher(tiny_config)
    assert teacher.name == f"mean-pooled-llm:{tiny_llm_dir}"
    emb = teacher.embed(TEXTS)
    assert emb.dtype == np.float32 and emb.shape == (4, 64) == (4, teacher_dim(tiny_config))
    np.testing.assert_array_equal(emb[2], 0)  # an empty response has no token to pool
    # Padding and batch composition do not change a row (length-sorted chunks of 2).
    for i in (0, 1, 3):
        np.testing.assert_allclose(teacher.embed([TEXTS[i]])[0], emb[i], atol=1e-5)
    # It is the mean of the LLM's last hidden states over the text's tokens.
    ids = teacher.tokenizer(TEXTS[1], return_tensors="pt")
    with torch.inference_mode():
        hidden = teacher.model(**ids).last_hidden_state[0]
    np.testing.assert_allclose(emb[1], hidden.mean(0).numpy(), atol=1e-5)


def test_teacher_model_overrides_the_default_spec(tiny_config, tiny_generator_llm_dir):
    tiny_config.teacher.kind = "mean-pooled-llm"
    tiny_config.teacher.model = str(tiny_generator_llm_dir)
    assert teacher_spec(tiny_config) == str(tiny_generator_llm_dir)
    assert teacher_dim(tiny_config) == 128
    tiny_config.model.teacher_dim = 7
    assert teacher_dim(tiny_config) == 7


def test_unknown_teacher_kind_lists_the_known_ones(tiny_config):
    assert TEACHERS.names() == ["cls-encoder", "llm2vec", "mean-pooled-llm", "sentence-transformers"]
    tiny_config.teacher.kind = "bge"
    with pytest.raises(
        ValueError,
        match="Unknown teacher kind 'bge'. Known: cls-encoder, llm2vec, mean-pooled-llm, "
              "sentence-transformers",
    ):
        teacher_spec(tiny_config)


# ----------------------------------------------------------------------------- llm2vec teacher


def _llm2vec_config(tiny_config, adapters):
    mntp, simcse = adapters
    tiny_config.teacher.kind = "llm2vec"
    tiny_config.teacher.model = str(mntp)
    tiny_config.teacher.adapter = str(simcse)
    tiny_config.teacher.batch_size = 2
    return tiny_config


def test_make_bidirectional_lets_later_tokens_change_earlier_states(tiny_llm_dir):
    from transformers import AutoModel

    from l2vg_ray.generate.teacher import make_bidirectional

    ids = torch.tensor([[5, 17, 23, 42, 8]])
    changed = ids.clone()
    changed[0, -1] = 99
    causal = AutoModel.from_pretrained(str(tiny_llm_dir)).eval()
    with torch.no_grad():
        a, b = causal(input_ids=ids).last_hidden_state, causal(input_ids=changed).last_hidden_state
    torch.testing.assert_close(a[0, 0], b[0, 0])  # causal: the first state cannot see the last token
    bi = make_bidirectional(AutoModel.from_pretrained(str(tiny_llm_dir))).eval()
    for mask in (None, torch.ones_like(ids)):  # with and without a materialised mask
        with torch.no_grad():
            a = bi(input_ids=ids, attention_mask=mask).last_hidden_state
            b = bi(input_ids=changed, attention_mask=mask).last_hidden_state
        assert (a[0, 0] - b[0, 0]).abs().max() > 1e-4


def test_llm2vec_teacher_merges_both_adapters_and_mean_pools_with_bos(
    tiny_config, tiny_llm_dir, tiny_llm2vec_adapters
):
    from peft import PeftModel
    from transformers import AutoModel, AutoTokenizer

    from l2vg_ray.generate.teacher import make_bidirectional

    cfg = _llm2vec_config(tiny_config, tiny_llm2vec_adapters)
    teacher = build_teacher(cfg)
    mntp, simcse = tiny_llm2vec_adapters
    assert teacher.name == f"llm2vec:{mntp}+{simcse}"
    assert teacher.dim == 64 == teacher_dim(cfg)
    texts = ["Paris is the capital of France.", "Two plus two is four, said the teacher."]
    emb = teacher.embed(texts)
    assert emb.dtype == np.float32 and emb.shape == (2, 64)

    # By hand: bidirectional base + the two LoRAs (not merged), mean over every token.
    tok = AutoTokenizer.from_pretrained(str(mntp))
    model = make_bidirectional(AutoModel.from_pretrained(str(tiny_llm_dir)))
    model = PeftModel.from_pretrained(model, str(mntp)).merge_and_unload()
    model = PeftModel.from_pretrained(model, str(simcse)).eval()
    for i, text in enumerate(texts):
        ids = tok(text, return_tensors="pt")
        with torch.no_grad():
            hidden = model(**ids).last_hidden_state[0]
        np.testing.assert_allclose(emb[i], hidden.mean(0).numpy(), atol=1e-5)
    # Left padding in a batch changes nothing (row 0 is padded next to the longer row 1).
    np.testing.assert_allclose(teacher.embed([texts[0]])[0], emb[0], atol=1e-5)

    # The adapters matter: the bare bidirectional base gives other vectors.
    base = make_bidirectional(AutoModel.from_pretrained(str(tiny_llm_dir))).eval()
    with torch.no_grad():
        plain = base(**tok(texts[0], return_tensors="pt")).last_hidden_state[0].mean(0)
    assert np.abs(emb[0] - plain.numpy()).max() > 1e-3


def test_llm2vec_teacher_names_a_non_adapter_clearly(tiny_config, tiny_llm_dir):
    tiny_config.teacher.kind = "llm2vec"
    tiny_config.teacher.model = str(tiny_llm_dir)  # a model folder, not an adapter
    with pytest.raises(ValueError, match="not a PEFT adapter"):
        build_teacher(tiny_config)


def test_cls_encoder_teacher_is_the_raw_first_position_state(tiny_config, tiny_bert_dir):
    """The official second version's teacher (BAAI/bge-m3-unsupervised): an encoder's [CLS]
    state, not normalised. Checked against a hand computation, one text at a time (no padding)."""
    from transformers import AutoModel, AutoTokenizer

    tiny_config.teacher.kind = "cls-encoder"
    tiny_config.model.teacher = str(tiny_bert_dir)
    tiny_config.teacher.max_length = 12
    tiny_config.teacher.batch_size = 3
    tiny_config.model.teacher_dim = None
    teacher = build_teacher(tiny_config)
    texts = [t for t in TEXTS if t] + ["a much longer text " * 10]
    got = teacher.embed(texts)
    assert got.dtype == np.float32 and got.shape == (len(texts), 32) == (len(texts), teacher.dim)
    assert teacher.name == f"cls-encoder:{tiny_bert_dir}" and teacher_dim(tiny_config) == 32

    tok = AutoTokenizer.from_pretrained(tiny_bert_dir)
    model = AutoModel.from_pretrained(tiny_bert_dir).eval()
    for text, row in zip(texts, got, strict=True):
        ids = tok(text, truncation=True, max_length=12, return_tensors="pt")
        assert ids["input_ids"][0, 0] == tok.cls_token_id
        with torch.no_grad():
            want = model(**ids).last_hidden_state[0, 0].numpy()
        np.testing.assert_allclose(row, want, rtol=1e-5, atol=1e-5)
    assert not np.allclose(np.linalg.norm(got, axis=1), 1.0)  # raw output, not normalised
