"""Training steps with the query prefix run once without gradient (``model.frozen_prefix``):
losses and every trainable gradient equal the one-pass reference's."""

from __future__ import annotations

import pytest
import torch

from l2vg_ray.config import ModelConfig
from l2vg_ray.method import L2VGEncoder

TEACHER_DIM = 8
SHORT_AND_LONG = [
    "Hi?",
    "Why is the sky blue? Sunlight scatters off air molecules, and blue light scatters most, "
    "so the whole sky looks blue to us on a clear day, except at sunset when it turns red.",
    "Who wrote Hamlet?",
    "",  # an empty query: only its special tokens
]
RESPONSES = ["Hello there.", "Because of scattering.", "Shakespeare wrote it.", "Nothing."]


def _encoder(llm_dir, frozen_prefix: bool, **overrides) -> L2VGEncoder:
    fields = dict(llm=str(llm_dir), teacher="unused", n_thought=2, n_compression=2,
                  max_length=80, max_response_length=12, device="cpu", frozen_prefix=frozen_prefix)
    fields.update(overrides)
    return L2VGEncoder.from_config(ModelConfig(**fields), teacher_dim=TEACHER_DIM)


def _step(enc: L2VGEncoder, batch: dict, **kw) -> tuple[dict, list[torch.Tensor]]:
    enc.train()
    for p in enc.trainable_parameters():
        p.grad = None
    out = enc(batch, **kw)
    out.loss.backward()
    losses = {k: getattr(out, k).detach() for k in ("loss", "recon_loss", "align_loss")
              if getattr(out, k) is not None}
    return losses, [p.grad.detach().clone() for p in enc.trainable_parameters()]


def _assert_equal_steps(ref, new, *, rtol=1e-4):
    (l_ref, g_ref), (l_new, g_new) = ref, new
    assert l_ref.keys() == l_new.keys()
    for k in l_ref:
        torch.testing.assert_close(l_new[k], l_ref[k], rtol=rtol, atol=0)
    for a, b in zip(g_ref, g_new, strict=True):
        # relative to the gradient's own scale (a few entries are ~0)
        torch.testing.assert_close(b, a, rtol=rtol, atol=rtol * float(a.abs().max()))


@pytest.mark.parametrize("n_thought,n_compression", [(0, 10), (10, 10), (2, 2)])
@pytest.mark.parametrize("terms", ["both", "align-only"])
def test_losses_and_gradients_equal_the_one_pass_reference(tiny_llm_dir, n_thought, n_compression, terms):
    kw = {"recon_weight": 0.0} if terms == "align-only" else {}
    ref = _encoder(tiny_llm_dir, False, n_thought=n_thought, n_compression=n_compression)
    new = _encoder(tiny_llm_dir, True, n_thought=n_thought, n_compression=n_compression)
    teacher = torch.randn(4, TEACHER_DIM, generator=torch.Generator().manual_seed(0))
    batch = ref.prepare_batch(SHORT_AND_LONG, RESPONSES, teacher)
    assert batch["query_attention_mask"].sum(-1).min() < 0.3 * batch["query_attention_mask"].shape[1]
    _assert_equal_steps(_step(ref, batch, **kw), _step(new, batch, **kw))


def test_the_prefix_runs_without_gradient_and_the_special_tokens_with(tiny_llm_dir):
    enc = _encoder(tiny_llm_dir, True)
    seen = []
    layer = enc.llm.base_model.layers[0]
    handle = layer.register_forward_pre_hook(
        lambda m, args, kwargs: seen.append((torch.is_grad_enabled(), args[0].shape[1])),
        with_kwargs=True)
    batch = enc.prepare_batch(SHORT_AND_LONG, RESPONSES)
    enc.train()
    enc(batch).loss.backward()
    width = batch["query_input_ids"].shape[1]
    n_special = len(enc.special_token_ids)
    # prefix without gradient, the special tokens with, then the decoder pass over the response
    assert seen[:2] == [(False, width - n_special), (True, n_special)]
    assert len(seen) == 3 and seen[2][0]

    seen.clear()
    with torch.no_grad():  # inference: one pass over the whole query, as before
        enc.encode(["Who wrote Hamlet?"])
    handle.remove()
    assert [s for s, _ in seen] == [False]


def test_a_batch_not_ending_in_the_special_tokens_takes_the_reference_path(tiny_llm_dir):
    """Right padding (pads after the special tokens) is not the frozen-prefix layout: the one-pass
    path runs, with the same result as the reference encoder."""
    ref, new = _encoder(tiny_llm_dir, False), _encoder(tiny_llm_dir, True)
    batch = ref.prepare_batch(SHORT_AND_LONG[:3], RESPONSES[:3])
    ids, mask = batch["query_input_ids"], batch["query_attention_mask"]
    right_ids, right_mask = torch.full_like(ids, ref.pad_token_id), torch.zeros_like(mask)
    for i in range(ids.shape[0]):
        n = int(mask[i].sum())
        right_ids[i, :n], right_mask[i, :n] = ids[i, -n:], 1
    assert new._hidden_over_frozen_prefix(right_ids, right_mask, right_mask.cumsum(-1) - 1) is None


def test_gradient_checkpointing_over_the_frozen_prefix(tiny_llm_dir):
    ref = _encoder(tiny_llm_dir, False)
    new = _encoder(tiny_llm_dir, True, gradient_checkpointing=True)
    batch = ref.prepare_batch(SHORT_AND_LONG, RESPONSES,
                              torch.randn(4, TEACHER_DIM, generator=torch.Generator().manual_seed(0)))
    _assert_equal_steps(_step(ref, batch), _step(new, batch))


@pytest.mark.gpu
@pytest.mark.parametrize("checkpointing", [False, True])
def test_bf16_autocast_on_gpu_matches_the_reference(tiny_llm_dir, checkpointing):
    ref = _encoder(tiny_llm_dir, False, device="cuda", gradient_checkpointing=checkpointing)
    new = _encoder(tiny_llm_dir, True, device="cuda", gradient_checkpointing=checkpointing)
    batch = ref.prepare_batch(SHORT_AND_LONG, RESPONSES,
                              torch.randn(4, TEACHER_DIM, generator=torch.Generator().manual_seed(0)))
    with torch.autocast("cuda", dtype=torch.bfloat16):
        a, b = _step(ref, batch), _step(new, batch)
    # bf16 rounds to ~3 significant digits: the two orders of summation differ at that level
    _assert_equal_steps(a, b, rtol=2e-2)


def test_in_float64_the_two_paths_agree_to_rounding_of_float64(tiny_llm_dir):
    """In float64 arithmetic the frozen-prefix step and the one-pass step are the same function:
    what differs in float32 is only the order of summation (the reference's own rounding)."""
    ref, new = _encoder(tiny_llm_dir, False), _encoder(tiny_llm_dir, True)
    ref.llm.to(torch.float64)
    new.llm.to(torch.float64)
    teacher = torch.randn(4, TEACHER_DIM, generator=torch.Generator().manual_seed(0))
    batch = ref.prepare_batch(SHORT_AND_LONG, RESPONSES, teacher)
    _assert_equal_steps(_step(ref, batch), _step(new, batch), rtol=1e-10)
