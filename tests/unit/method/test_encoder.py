"""L2VGEncoder on the tiny random Llama (``tiny_llm_dir``): every "Done when" of issue 3."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from l2vg_ray.config import ModelConfig
from l2vg_ray.method import L2VGEncoder, L2VGOutput
from l2vg_ray.method.losses import IGNORE_INDEX
from l2vg_ray.method.model import TRAINABLE_FILE, saved_encoder_info
from l2vg_ray.text_encoders import ENCODER_CONFIG_FILE, TextEncoder

TEACHER_DIM = 8
QUERIES = [
    "What is the capital of France?",
    "Who wrote Hamlet?",
    "What is two plus two?",
    "Why is the sky blue? Sunlight scatters off air molecules.",
]
# Shared first token: the soft prompts, not the LLM's prior, must choose the continuation.
RESPONSES = [
    "The capital is Paris.",
    "The play is by Shakespeare.",
    "The sum is four.",
    "The light scatters.",
]


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def make_encoder(llm_dir, **overrides) -> L2VGEncoder:
    fields = dict(
        llm=str(llm_dir),
        teacher="unused",
        n_thought=2,
        n_compression=2,
        max_length=24,
        max_response_length=12,
        device="cpu",
    )
    fields.update(overrides)
    return L2VGEncoder.from_config(ModelConfig(**fields), teacher_dim=TEACHER_DIM)


def teacher(n: int = 4, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, TEACHER_DIM, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def fluent_llm_dir(tiny_llm_dir, tmp_path_factory):
    """The tiny LLM after memorising ``query + response``: like a real LLM, it can produce its
    own responses (a random 2-layer model only copies its current token)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_llm_dir)
    torch.manual_seed(0)
    llm = AutoModelForCausalLM.from_pretrained(tiny_llm_dir)
    rows = [
        tok(q)["input_ids"] + tok(r)["input_ids"] + [tok.eos_token_id]
        for q, r in zip(QUERIES, RESPONSES, strict=True)
    ]
    width = max(map(len, rows))
    ids = torch.tensor([r + [tok.pad_token_id] * (width - len(r)) for r in rows])
    mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows])
    labels = ids.masked_fill(mask == 0, IGNORE_INDEX)
    opt = torch.optim.Adam(llm.parameters(), lr=3e-3)
    llm.train()
    for _ in range(150):
        loss = llm(input_ids=ids, attention_mask=mask, labels=labels).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    out = tmp_path_factory.mktemp("models") / "fluent-llm"
    llm.save_pretrained(out)
    tok.save_pretrained(out)
    return out


# ---------------------------------------------------------------- tokenisation and masking
@pytest.mark.parametrize("n_thought", [2, 0])
def test_special_tokens_end_every_row_under_left_padding_and_truncation(tiny_llm_dir, n_thought):
    enc = make_encoder(tiny_llm_dir, n_thought=n_thought, n_compression=3, max_length=12)
    assert len(enc.special_token_ids) == n_thought + 3
    assert len(set(enc.special_token_ids)) == n_thought + 3
    long = " ".join(["The sea is wide and blue and deep."] * 10)
    batch = enc.prepare_batch(["Hi", "", QUERIES[0], long])
    ids, mask = batch["query_input_ids"], batch["query_attention_mask"]
    n = len(enc.special_token_ids)
    assert ids.shape[1] == 12  # the long query was cut to max_length
    for row, m in zip(ids, mask, strict=True):
        assert row[-n:].tolist() == enc.special_token_ids
        first = int(m.argmax())  # left padding: zeros, then ones to the end
        assert m[:first].sum() == 0 and bool(m[first:].all())
        assert not set(row[first:-n].tolist()) & set(enc.special_token_ids)
    # The truncated query keeps its beginning.
    head = enc.tokenizer(long)["input_ids"][: 12 - n]
    assert ids[3, : 12 - n].tolist() == head
    assert enc.count_tokens([long])[0] > 12  # counts before truncation
    assert enc.max_input_tokens == 12
    short = ["What is it?"]
    assert enc.count_tokens(short, instruction="Find:") == enc.count_tokens(["Find: What is it?"])


def test_labels_are_response_tokens_plus_eos_only(tiny_llm_dir):
    enc = make_encoder(tiny_llm_dir)
    batch = enc.prepare_batch(QUERIES[:2], ["Paris.", "William Shakespeare wrote it."])
    labels, r_ids, r_mask = (
        batch["labels"],
        batch["response_input_ids"],
        batch["response_attention_mask"],
    )
    for i, resp in enumerate(["Paris.", "William Shakespeare wrote it."]):
        want = enc.tokenizer(resp, add_special_tokens=False)["input_ids"] + [enc.eos_token_id]
        scored = labels[i][labels[i] != IGNORE_INDEX].tolist()
        assert scored == want
        assert labels[i, -len(want) :].tolist() == want  # right-aligned
        assert (labels[i] != IGNORE_INDEX).tolist() == r_mask[i].bool().tolist()
    assert torch.equal(r_ids[r_mask.bool()], labels[labels != IGNORE_INDEX])
    # The query (its length, hence its padding) does not move or change what is scored.
    other = enc.prepare_batch(["x", QUERIES[3] * 3], ["Paris.", "William Shakespeare wrote it."])
    assert torch.equal(other["labels"], labels)
    # Over-long responses are cut but still end in eos.
    cut = enc.prepare_batch(["q"], [" ".join(["blue"] * 50)])["labels"][0]
    assert len(cut) == 12 and cut[-1].item() == enc.eos_token_id


def test_reconstruction_loss_matches_unpadded_per_example_reference(tiny_llm_dir):
    enc = make_encoder(tiny_llm_dir)
    resp = ["Paris.", "The play is by William Shakespeare.", "Four."]
    batch = enc.prepare_batch(QUERIES[:3], resp, teacher(3))
    out = enc(batch)
    assert isinstance(out, L2VGOutput)
    assert int(out.n_response_tokens) == int((batch["labels"] != IGNORE_INDEX).sum())

    # Reference: each example alone, no padding anywhere, LLM's own forward and shift.
    total, count = 0.0, 0
    emb_ref = []
    with torch.no_grad():
        for q, r in zip(QUERIES[:3], resp, strict=True):
            one = enc.prepare_batch([q], [r])
            soft = enc.soft_prompts_from_ids(one["query_input_ids"], one["query_attention_mask"])
            emb_ref.append(enc.embed_soft_prompts(soft)[0])
            r_ids = one["response_input_ids"]
            embeds = torch.cat([soft, enc.llm.get_input_embeddings()(r_ids)], dim=1)
            logits = enc.llm(inputs_embeds=embeds).logits[0, soft.shape[1] - 1 : -1]
            total += F.cross_entropy(logits, r_ids[0], reduction="sum").item()
            count += r_ids.shape[1]
    assert out.recon_loss.item() == pytest.approx(total / count, rel=1e-5)
    torch.testing.assert_close(out.embeddings.detach(), torch.stack(emb_ref), atol=1e-5, rtol=1e-5)
    expected_align = ((torch.stack(emb_ref) - batch["teacher_embeddings"]) ** 2).mean()
    assert out.align_loss.item() == pytest.approx(expected_align.item(), rel=1e-4)
    assert out.loss.item() == pytest.approx(out.recon_loss.item() + out.align_loss.item())

    # Masked positions carry no information: garbage token ids under the padding change nothing.
    noisy = {k: v.clone() for k, v in batch.items()}
    for ids_key, mask_key in [
        ("response_input_ids", "response_attention_mask"),
        ("query_input_ids", "query_attention_mask"),
    ]:
        pad = noisy[mask_key] == 0
        assert pad.any()
        noisy[ids_key][pad] = 7
    out2 = enc(noisy)
    assert out2.recon_loss.item() == pytest.approx(out.recon_loss.item(), abs=1e-6)
    # Weights apply to the named terms.
    weighted = enc(batch, recon_weight=0.0, align_weight=2.0)
    assert weighted.loss.item() == pytest.approx(2.0 * out.align_loss.item(), rel=1e-6)


def test_forward_without_responses_or_teacher(tiny_llm_dir):
    enc = make_encoder(tiny_llm_dir)
    out = enc(enc.prepare_batch(QUERIES[:2]))
    assert out.loss is None and out.recon_loss is None and out.align_loss is None
    assert out.embeddings.shape == (2, TEACHER_DIM) and int(out.n_response_tokens) == 0
    no_thought = make_encoder(tiny_llm_dir, n_thought=0)
    out = no_thought(no_thought.prepare_batch(QUERIES[:2], RESPONSES[:2], teacher(2)))
    assert torch.isfinite(out.loss) and out.embeddings.shape == (2, TEACHER_DIM)
    with pytest.raises(ValueError, match="one response per query"):
        enc.prepare_batch(QUERIES[:2], ["a"])
    with pytest.raises(ValueError, match=r"\(2, 8\)"):
        enc.prepare_batch(QUERIES[:2], teacher_embeddings=np.zeros((2, 5)))


# ---------------------------------------------------------------- what trains
def test_only_trainable_parameters_get_gradients_and_frozen_weights_stay_bit_identical(
    tiny_llm_dir,
):
    enc = make_encoder(tiny_llm_dir)
    trainable = enc.trainable_parameters()
    assert {id(p) for p in enc.parameters() if p.requires_grad} == {id(p) for p in trainable}
    vocab_rows = enc.llm.get_input_embeddings().weight.shape[0]
    assert vocab_rows == enc.llm.config.vocab_size  # the embedding matrix was not resized
    frozen_before = {k: v.clone() for k, v in enc.llm.state_dict().items()}
    trainable_before = [p.detach().clone() for p in trainable]

    enc.train()
    assert not enc.llm.training
    opt = torch.optim.AdamW(trainable, lr=1e-2, weight_decay=0.1)
    batch = enc.prepare_batch(QUERIES, RESPONSES, teacher())
    for _ in range(3):
        out = enc(batch)
        opt.zero_grad()
        out.loss.backward()
        assert all(p.grad is None for p in enc.llm.parameters())
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in trainable)
        opt.step()

    for k, v in enc.llm.state_dict().items():
        assert torch.equal(v, frozen_before[k]), k
    for before, p in zip(trainable_before, trainable, strict=True):
        assert not torch.equal(before, p.detach())


def test_gradient_checkpointing_recomputes_and_matches(tiny_llm_dir):
    plain, ckpt = (
        make_encoder(tiny_llm_dir),
        make_encoder(tiny_llm_dir, gradient_checkpointing=True),
    )
    batch = plain.prepare_batch(QUERIES[:2], RESPONSES[:2], teacher(2))
    grads = []
    for enc in (plain, ckpt):
        calls = []
        mlp = enc.llm.base_model.layers[0].mlp
        # A pre-hook: the replay stops early, inside the layer's last module.
        handle = mlp.register_forward_pre_hook(lambda *_, c=calls: c.append(1))
        enc.train()
        out = enc(batch)
        out.loss.backward()
        handle.remove()
        grads.append([p.grad.clone() for p in enc.trainable_parameters()])
        # Three LLM passes (the query prefix without gradient, the special tokens, the
        # reconstruction); checkpointing replays the two with gradient in backward.
        assert len(calls) == (5 if enc is ckpt else 3)
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


def test_overfitting_four_examples_lowers_both_losses_and_decode_reproduces(fluent_llm_dir):
    enc = make_encoder(fluent_llm_dir, n_thought=1, max_length=32)
    batch = enc.prepare_batch(QUERIES, RESPONSES, teacher())
    opt = torch.optim.Adam(enc.trainable_parameters(), lr=1e-2)
    enc.train()
    first = enc(batch)
    for _ in range(100):
        out = enc(batch)
        opt.zero_grad()
        out.loss.backward()
        opt.step()
    enc.eval()
    last = enc(batch)
    assert last.recon_loss.item() < 0.25 * first.recon_loss.item()
    assert last.align_loss.item() < 0.05 * first.align_loss.item()

    assert enc.decode(QUERIES, max_new_tokens=12) == RESPONSES
    # Precomputed soft prompts decode the same way.
    soft = enc.soft_prompts(QUERIES[:2])
    assert soft.shape == (2, enc.n_compression, enc.hidden_size)
    assert enc.decode(soft, max_new_tokens=12) == RESPONSES[:2]


# ---------------------------------------------------------------- encode
def test_encode_is_deterministic_and_batch_size_invariant(tiny_llm_dir):
    enc = make_encoder(tiny_llm_dir)
    assert isinstance(enc, TextEncoder)
    texts = [*QUERIES, "a", "Give me three tips for better sleep, please, today."]
    full = enc.encode(texts, batch_size=len(texts))
    assert full.shape == (len(texts), TEACHER_DIM) and full.dtype == np.float32
    assert np.array_equal(full, enc.encode(texts, batch_size=len(texts)))
    for bs in (1, 2, 4):
        np.testing.assert_allclose(enc.encode(texts, batch_size=bs), full, atol=1e-5, rtol=0)
    # Order and company do not matter either (different padding per batch).
    np.testing.assert_allclose(enc.encode(texts[::-1], batch_size=3)[::-1], full, atol=1e-5, rtol=0)
    # encode == forward's embeddings
    out = enc(enc.prepare_batch(texts))
    np.testing.assert_allclose(out.embeddings.detach().numpy(), full, atol=1e-5, rtol=0)


def test_encode_normalize_instruction_and_empty(tiny_llm_dir):
    enc = make_encoder(tiny_llm_dir)
    unit = enc.encode(QUERIES, normalize=True)
    np.testing.assert_allclose(np.linalg.norm(unit, axis=1), 1.0, atol=1e-5)
    raw = enc.encode(QUERIES)
    np.testing.assert_allclose(unit, raw / np.linalg.norm(raw, axis=1, keepdims=True), atol=1e-6)
    inst = enc.encode(QUERIES[:2], instruction="Retrieve the answer:")
    np.testing.assert_allclose(
        inst, enc.encode([f"Retrieve the answer: {q}" for q in QUERIES[:2]]), atol=1e-6
    )
    assert not np.allclose(inst, raw[:2], atol=1e-4)
    assert enc.encode([]).shape == (0, TEACHER_DIM)
    with pytest.raises(TypeError, match="list of strings"):
        enc.encode("one string")


# ---------------------------------------------------------------- checkpoints
def test_save_load_round_trips_exactly_with_only_trainable_tensors(tiny_llm_dir, tmp_path):
    from safetensors.torch import load_file

    enc = make_encoder(tiny_llm_dir)
    with torch.no_grad():  # move away from the deterministic init
        for p in enc.trainable_parameters():
            p.add_(torch.randn_like(p) * 0.1)
    enc.save(tmp_path / "enc")
    assert sorted(f.name for f in (tmp_path / "enc").iterdir()) == [
        ENCODER_CONFIG_FILE,
        TRAINABLE_FILE,
    ]
    tensors = load_file(str(tmp_path / "enc" / TRAINABLE_FILE))
    assert set(tensors) == set(enc.trainable_state_dict())
    n_trainable = sum(p.numel() for p in enc.trainable_parameters())
    assert sum(t.numel() for t in tensors.values()) == n_trainable
    h = enc.hidden_size
    assert n_trainable == 4 * h + h * h + h + h * TEACHER_DIM + TEACHER_DIM
    meta = json.loads((tmp_path / "enc" / ENCODER_CONFIG_FILE).read_text())
    assert meta["model"]["llm"] == str(tiny_llm_dir)
    assert meta["model"]["teacher_dim"] == TEACHER_DIM and meta["model"]["n_compression"] == 2

    loaded = L2VGEncoder.load(tmp_path / "enc", device="cpu")
    for k, v in enc.trainable_state_dict().items():
        assert torch.equal(loaded.trainable_state_dict()[k], v), k
    assert loaded.fingerprint() == enc.fingerprint()
    assert np.array_equal(loaded.encode(QUERIES), enc.encode(QUERIES))
    assert loaded.special_token_ids == enc.special_token_ids

    # Read from the folder's two small files, without the LLM: the same name, size and key.
    info = saved_encoder_info(tmp_path / "enc")
    assert (info.name, info.dim, info.fingerprint) == (loaded.name, loaded.dim, loaded.fingerprint())
    loaded.set_max_length(16)
    assert saved_encoder_info(tmp_path / "enc", max_length=16).fingerprint == loaded.fingerprint()
    assert loaded.fingerprint() != enc.fingerprint()

    other = make_encoder(tiny_llm_dir, n_compression=3)
    with pytest.raises(ValueError, match="special_embeddings"):
        other.load_trainable_state_dict(tensors)
    with pytest.raises(FileNotFoundError, match=ENCODER_CONFIG_FILE):
        L2VGEncoder.load(tmp_path)


def test_fingerprint_tracks_trainable_state(tiny_llm_dir):
    a, b = make_encoder(tiny_llm_dir), make_encoder(tiny_llm_dir)
    assert a.fingerprint() == b.fingerprint()  # deterministic init
    with torch.no_grad():
        b.alignment.bias[0] += 1e-3
    assert a.fingerprint() != b.fingerprint()
    assert make_encoder(tiny_llm_dir, n_thought=3).fingerprint() != a.fingerprint()


def test_bfloat16_llm_keeps_float32_trainable_state(tiny_llm_dir):
    enc = make_encoder(tiny_llm_dir, dtype="bfloat16")
    assert enc.llm_dtype == torch.bfloat16
    assert all(p.dtype == torch.float32 for p in enc.trainable_parameters())
    out = enc(enc.prepare_batch(QUERIES[:2], RESPONSES[:2], teacher(2)))
    out.loss.backward()
    assert torch.isfinite(out.loss) and out.embeddings.dtype == torch.float32
    assert all(
        p.grad is not None and p.grad.dtype == torch.float32 for p in enc.trainable_parameters()
    )


def test_from_config_reads_teacher_dim_from_the_teacher(tiny_config):
    enc = L2VGEncoder.from_config(tiny_config.model, cache_dir=tiny_config.cache_dir)
    assert enc.dim == 32  # the tiny teacher's dimension
    assert enc.device.type == ("cuda" if torch.cuda.is_available() else "cpu")
    assert enc.encode(["hello"]).shape == (1, 32)
    with pytest.raises(ValueError, match="Unknown model config keys"):
        L2VGEncoder.from_config({"llm": "x", "n_compresion": 3})


def test_token_init_text_starts_the_last_special_tokens_as_its_token_embeddings(tiny_llm_dir):
    text = " The answer is:"
    enc = make_encoder(tiny_llm_dir, n_thought=3, n_compression=3, token_init_text=text)
    rows = enc.llm.get_input_embeddings().weight.detach()
    ids = enc.tokenizer(text, add_special_tokens=False)["input_ids"]
    k = min(len(ids), 6)
    torch.testing.assert_close(enc.special_embeddings.detach()[-k:], rows[ids[-k:]])
    plain = make_encoder(tiny_llm_dir, n_thought=3, n_compression=3)
    # The rows the text does not cover keep the default (mean + noise) start.
    torch.testing.assert_close(enc.special_embeddings.detach()[: 6 - k],
                               plain.special_embeddings.detach()[: 6 - k])


def test_empty_token_init_text_is_the_default_and_whitespace_is_refused(tiny_llm_dir):
    from l2vg_ray.method.model import init_text_ids

    a, b = make_encoder(tiny_llm_dir, token_init_text=None), make_encoder(tiny_llm_dir)
    torch.testing.assert_close(a.special_embeddings, b.special_embeddings)
    with pytest.raises(ValueError, match="has no tokens"):
        init_text_ids(a.tokenizer, "")


def test_a_zero_weight_term_is_not_computed(tiny_llm_dir, monkeypatch):
    enc = make_encoder(tiny_llm_dir)
    batch = enc.prepare_batch(QUERIES, RESPONSES, teacher())
    calls = []
    real = enc.reconstruction_logits
    monkeypatch.setattr(enc, "reconstruction_logits", lambda *a, **k: calls.append(1) or real(*a, **k))
    out = enc(batch, recon_weight=0.0, align_weight=1.0)
    assert calls == [] and out.recon_loss is None and out.align_loss is not None
    torch.testing.assert_close(out.loss, out.align_loss)
    out = enc(batch, recon_weight=1.0, align_weight=0.0)
    assert calls == [1] and out.align_loss is None
    torch.testing.assert_close(out.loss, out.recon_loss)


def test_forward_uses_the_configured_alignment_loss(tiny_llm_dir):
    from l2vg_ray.method.losses import TargetStats, alignment_loss

    enc = make_encoder(tiny_llm_dir)
    t = teacher()
    stats = TargetStats.from_targets(t)
    batch = enc.prepare_batch(QUERIES, None, t)
    out = enc(batch, align_loss="normalized-mse", target_stats=stats)
    expected = alignment_loss(out.embeddings, t, kind="normalized-mse", stats=stats)
    torch.testing.assert_close(out.align_loss, expected)


def test_calibrated_heads_start_at_the_embedding_and_target_scales(tiny_llm_dir):
    from l2vg_ray.method.losses import TargetStats

    enc = make_encoder(tiny_llm_dir)
    t = teacher(64) * 3.0 + 5.0  # an unnormalised teacher far from the origin
    stats = TargetStats.from_targets(t)
    scales = enc.calibrate_heads(QUERIES, target_mean=stats.mean,
                                 target_std=stats.mean_vector_mse ** 0.5, spread=0.1)
    assert set(scales) == {"reconstruction_scale", "alignment_scale"}
    rows = enc.llm.get_input_embeddings().weight.detach()
    soft = enc.soft_prompts(QUERIES).reshape(-1, enc.hidden_size)
    # Soft prompts: centred on the mean embedding row, with the rows' spread.
    torch.testing.assert_close(soft.mean(0), rows.mean(0), atol=1e-4, rtol=0)
    spread = (soft - soft.mean(0)).pow(2).sum(-1).mean().sqrt()
    want = (rows - rows.mean(0)).pow(2).sum(-1).mean().sqrt()
    assert float(spread / want) == pytest.approx(1.0, rel=1e-3)
    # Embeddings: centred on the targets' mean, spread 0.1 x the targets' -> loss ~ mean guess.
    emb = torch.from_numpy(enc.encode(QUERIES))
    torch.testing.assert_close(emb.mean(0), stats.mean, atol=1e-4, rtol=1e-4)
    e_spread = (emb - emb.mean(0)).pow(2).sum(-1).mean().sqrt()
    t_spread = (stats.var.sum()).sqrt()
    assert float(e_spread / t_spread) == pytest.approx(0.1, rel=1e-3)
    # Same inputs -> the same calibrated state (every Ray Train worker agrees).
    other = make_encoder(tiny_llm_dir)
    other.calibrate_heads(QUERIES, target_mean=stats.mean, target_std=stats.mean_vector_mse ** 0.5)
    assert other.fingerprint() == enc.fingerprint()


def test_set_max_length_embeds_longer_inputs_and_is_seen_by_the_fingerprint(tiny_llm_dir):
    enc = make_encoder(tiny_llm_dir, max_length=8)
    long_text = " ".join(f"word{i}" for i in range(40))
    n_special = len(enc.special_token_ids)
    assert len(enc._query_ids([long_text])[0]) == 8
    short = enc.encode([long_text])
    fp = enc.fingerprint()
    enc.set_max_length(32)
    ids = enc._query_ids([long_text])[0]
    assert len(ids) == 32 and ids[-n_special:] == enc.special_token_ids
    assert enc.fingerprint() != fp  # cached embeddings of the short inputs are not reused
    assert not np.allclose(enc.encode([long_text]), short)
    with pytest.raises(ValueError, match="no room"):
        enc.set_max_length(n_special)


def test_load_encoder_max_length_reaches_the_trained_encoder_and_the_baselines(
    tiny_llm_dir, tiny_config, tmp_path
):
    from l2vg_ray.loading import load_encoder

    make_encoder(tiny_llm_dir, max_length=8).save(tmp_path / "enc")
    assert load_encoder(str(tmp_path / "enc"), tiny_config).config.max_length == 8
    assert load_encoder(str(tmp_path / "enc"), tiny_config, max_length=24).config.max_length == 24
    pooled = load_encoder("mean-pool", tiny_config, max_length=17)
    assert pooled.max_length == 17 != int(tiny_config.model.max_length)
    assert load_encoder("mean-pool", tiny_config).max_length == int(tiny_config.model.max_length)


def test_an_encoder_trained_without_reconstruction_refuses_to_decode(tiny_llm_dir, tmp_path):
    from l2vg_ray.method.model import can_decode

    enc = make_encoder(tiny_llm_dir)
    assert enc.objective is None and enc.decodable and can_decode(enc)  # unknown: decodes
    enc.objective = {"recon_weight": 0.0, "align_weight": 1.0, "align_loss": "normalized-mse"}
    enc.save(tmp_path / "enc")
    meta = json.loads((tmp_path / "enc" / ENCODER_CONFIG_FILE).read_text())
    assert meta["objective"]["recon_weight"] == 0.0
    loaded = L2VGEncoder.load(tmp_path / "enc", device="cpu")
    assert loaded.objective == enc.objective and not can_decode(loaded)
    with pytest.raises(ValueError, match=r"train\.recon_weight=0.*never trained to be decoded"):
        loaded.decode(QUERIES[:1], max_new_tokens=2)
    assert loaded.fingerprint() == enc.fingerprint()  # the objective is not part of the state

    enc.objective = {"recon_weight": 1.0, "align_weight": 1.0, "align_loss": "normalized-mse"}
    enc.save(tmp_path / "both")
    assert can_decode(L2VGEncoder.load(tmp_path / "both", device="cpu"))
