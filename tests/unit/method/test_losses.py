from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from l2vg_ray.method.losses import (
    ALIGNMENT_LOSSES,
    IGNORE_INDEX,
    TargetStats,
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


# A hand-computed example: two rows, two dimensions.
#   student  [[1, 0], [0, 2]]      teacher [[0, 0], [2, 2]]
#   squared errors [[1, 0], [4, 0]] -> MSE = 5/4
#   stats: mean [0, 1], var [1, 4]  (so mean per-dim variance = 2.5)
_S = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
_T = torch.tensor([[0.0, 0.0], [2.0, 2.0]])
_STATS = TargetStats(mean=torch.tensor([0.0, 1.0]), var=torch.tensor([1.0, 4.0]))


def test_alignment_mse_is_the_papers_plain_mse():
    assert alignment_loss(_S, _T, kind="mse").item() == pytest.approx(1.25)
    # ...and the default kind, whatever the stats (the paper setting stays reachable exactly).
    torch.testing.assert_close(alignment_loss(_S, _T), F.mse_loss(_S, _T))
    torch.testing.assert_close(alignment_loss(_S, _T, kind="mse", stats=_STATS), F.mse_loss(_S, _T))


def test_alignment_normalized_mse_divides_by_the_mean_target_variance():
    # 1.25 / 2.5
    assert alignment_loss(_S, _T, kind="normalized-mse", stats=_STATS).item() == pytest.approx(0.5)


def test_alignment_standardized_mse_weights_each_dimension_by_its_variance():
    # errors / var per dim: [[1/1, 0/4], [4/1, 0/4]] -> mean = 5/4
    got = alignment_loss(_S, _T, kind="standardized-mse", stats=_STATS).item()
    assert got == pytest.approx(1.25)
    # A dimension with 4x the variance counts a quarter as much.
    s2 = torch.tensor([[0.0, 2.0], [2.0, 2.0]])  # error 4 on the high-variance dim only
    assert alignment_loss(s2, _T, kind="standardized-mse", stats=_STATS).item() == pytest.approx(0.25)


def test_standardized_mse_floors_a_constant_dimension():
    from l2vg_ray.method.losses import VAR_FLOOR, TargetStats

    # Dimension 1 is constant in the targets (variance 0), as three of MiniLM's are.
    stats = TargetStats(mean=torch.zeros(2), var=torch.tensor([2.0, 0.0]))
    s, t = torch.tensor([[1.0, 0.1]]), torch.tensor([[0.0, 0.0]])
    floor = VAR_FLOOR * 1.0  # VAR_FLOOR x the mean variance (2 + 0) / 2
    expected = (1.0 / 2.0 + 0.01 / floor) / 2
    got = alignment_loss(s, t, kind="standardized-mse", stats=stats).item()
    assert got == pytest.approx(expected) and got < 1.0


def test_alignment_cosine_is_one_minus_cosine():
    # row 0: cos([1,0],[0,0]) = 0 (zero teacher vector, eps-guarded) -> 1
    # row 1: cos([0,2],[2,2]) = 1/sqrt(2) -> 1 - 0.7071
    expected = (1.0 + (1.0 - 2**-0.5)) / 2
    assert alignment_loss(_S, _T, kind="cosine").item() == pytest.approx(expected, rel=1e-5)
    # scale-free: scaling the student changes nothing
    assert alignment_loss(10 * _S, _T, kind="cosine").item() == pytest.approx(expected, rel=1e-5)


def test_mean_vector_scores_one_under_the_scaled_losses():
    """The property that makes the scaled kinds teacher-independent: predicting the targets'
    mean scores exactly 1.0, for a unit-norm teacher and for one 100x larger."""
    g = torch.Generator().manual_seed(0)
    for scale in (1.0, 100.0):
        t = F.normalize(torch.randn(64, 8, generator=g), dim=-1) * scale
        stats = TargetStats.from_targets(t)
        mean = stats.mean.expand_as(t)
        for kind in ("normalized-mse", "standardized-mse"):
            assert alignment_loss(mean, t, kind=kind, stats=stats).item() == pytest.approx(1.0, rel=1e-4)
        assert stats.mean_vector_mse == pytest.approx(F.mse_loss(mean, t).item(), rel=1e-5)
        assert stats.zero_vector_mse == pytest.approx((t**2).mean().item(), rel=1e-5)


def test_scaled_losses_need_stats_and_unknown_kinds_are_listed():
    with pytest.raises(ValueError, match="TargetStats"):
        alignment_loss(_S, _T, kind="normalized-mse")
    with pytest.raises(ValueError, match="normalized-mse"):
        alignment_loss(_S, _T, kind="msee")
    assert set(ALIGNMENT_LOSSES.names()) == {"mse", "normalized-mse", "standardized-mse", "cosine"}


def test_target_stats_from_moments_equals_from_targets():
    g = torch.Generator().manual_seed(1)
    t = torch.randn(50, 6, generator=g).double()
    a = TargetStats.from_targets(t)
    b = TargetStats.from_moments(50, t.sum(0), (t * t).sum(0))
    torch.testing.assert_close(a.mean, b.mean)
    torch.testing.assert_close(a.var, b.var, rtol=1e-5, atol=1e-6)
    assert TargetStats.from_lists(a.as_lists()).var.tolist() == pytest.approx(a.var.tolist())


def test_combine_losses_weights_and_missing_terms():
    r, a = torch.tensor(2.0), torch.tensor(3.0)
    out = combine_losses(r, a, recon_weight=0.5, align_weight=2.0)
    assert out["loss"].item() == pytest.approx(7.0)
    assert out["recon_loss"] is r and out["align_loss"] is a
    assert combine_losses(None, a)["loss"].item() == pytest.approx(3.0)
    assert combine_losses(None, None)["loss"] is None
