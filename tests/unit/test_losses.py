from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from l2vg_ray.encoder.losses import (
    IGNORE_INDEX,
    alignment_loss,
    combine_losses,
    reconstruction_loss,
)


def _logits_labels(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(3, 5, 11, generator=g)
    labels = torch.randint(0, 11, (3, 5), generator=g)
    labels[0, :2] = IGNORE_INDEX  # left padding of a short response
    labels[2, :4] = IGNORE_INDEX
    return logits, labels


def test_reconstruction_loss_is_token_mean_over_labelled_positions():
    logits, labels = _logits_labels()
    mask = labels != IGNORE_INDEX
    per_token = [
        F.cross_entropy(logits[b, j : j + 1], labels[b, j : j + 1])
        for b in range(3)
        for j in range(5)
        if mask[b, j]
    ]
    expected = torch.stack(per_token).mean()
    torch.testing.assert_close(reconstruction_loss(logits, labels), expected)


def test_reconstruction_loss_ignores_unlabelled_positions():
    logits, labels = _logits_labels()
    base = reconstruction_loss(logits, labels)
    changed = logits.clone()
    changed[labels == IGNORE_INDEX] = torch.randn_like(changed[labels == IGNORE_INDEX]) * 50
    assert torch.equal(reconstruction_loss(changed, labels), base)
    # ...while a labelled position does count.
    changed = logits.clone()
    changed[1, 0, 0] += 10.0
    assert not torch.equal(reconstruction_loss(changed, labels), base)


def test_reconstruction_loss_no_labels_is_zero_with_graph():
    logits = torch.randn(2, 3, 7, requires_grad=True)
    loss = reconstruction_loss(logits, torch.full((2, 3), IGNORE_INDEX))
    assert loss.item() == 0.0
    loss.backward()
    assert torch.equal(logits.grad, torch.zeros_like(logits))


def test_reconstruction_loss_shape_mismatch_names_shapes():
    with pytest.raises(ValueError, match=r"\(2, 3\)"):
        reconstruction_loss(torch.randn(2, 4, 7), torch.zeros(2, 3, dtype=torch.long))


def test_alignment_loss_is_mse_and_checks_dims():
    s, t = torch.randn(4, 6), torch.randn(4, 6)
    torch.testing.assert_close(alignment_loss(s, t), ((s - t) ** 2).mean())
    assert alignment_loss(t, t).item() == 0.0
    with pytest.raises(ValueError, match="teacher_dim"):
        alignment_loss(torch.randn(4, 6), torch.randn(4, 5))


def test_combine_losses_weights_and_missing_terms():
    r, a = torch.tensor(2.0), torch.tensor(3.0)
    out = combine_losses(r, a, recon_weight=0.5, align_weight=2.0)
    assert out["loss"].item() == pytest.approx(7.0)
    assert out["recon_loss"] is r and out["align_loss"] is a
    assert combine_losses(None, a)["loss"].item() == pytest.approx(3.0)
    assert combine_losses(None, None)["loss"] is None
