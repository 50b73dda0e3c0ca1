"""LLM2Vec-Gen training losses: pure functions on tensors, returning named terms.

- ``reconstruction_loss``: next-token cross-entropy of the frozen LLM on the response tokens only
  (positions labelled ``IGNORE_INDEX`` contribute nothing, not even to the mean's denominator).
- ``alignment_loss``: how far the student embedding (mean over compression positions) is from
  the teacher's embedding of the response, by one of the ``ALIGNMENT_LOSSES``:

  ========================  ================================================================
  ``mse``                   plain MSE over all elements: the paper's term (its weights 1.0/1.0
                            were set for an LLM2Vec teacher whose targets are not normalised)
  ``normalized-mse``        MSE / the targets' mean per-dimension variance: 1.0 is what
                            predicting the mean teacher vector scores, 0 is a perfect match,
                            whatever the teacher's scale (the default)
  ``standardized-mse``      MSE per dimension / that dimension's variance, averaged: every
                            dimension counts as much as every other; 1.0 = the mean vector.
                            Variances are floored at ``VAR_FLOOR`` x their mean: a teacher
                            can have constant dimensions (all-MiniLM-L6-v2 has three with
                            variance 0 over the laptop targets), which would weigh ~1e12
  ``cosine``                1 - cosine(student, teacher), averaged over rows: scale-free
  ========================  ================================================================

  The student always predicts the teacher's own (raw) vectors, so its embeddings live in the
  teacher's space whatever the loss; only how errors are weighted changes. The scaled kinds need
  ``TargetStats`` of the training targets (``TargetStats.from_targets``).
- ``combine_losses``: the weighted total plus both terms by name.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from l2vg_ray.registry import Registry

IGNORE_INDEX = -100


def reconstruction_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean next-token CE over labelled positions.

    ``logits[:, j]`` is the prediction for ``labels[:, j]`` (already aligned: no shift here).
    Shapes: logits (B, R, V), labels (B, R) with ``IGNORE_INDEX`` where nothing is scored.
    Returns 0 (with a graph) when no position is labelled, so a batch of empty responses does
    not produce NaN.
    """
    if logits.shape[:2] != labels.shape:
        raise ValueError(
            f"logits {tuple(logits.shape)} and labels {tuple(labels.shape)} disagree on (batch, "
            f"positions); align them before calling reconstruction_loss."
        )
    mask = labels != IGNORE_INDEX
    n = mask.sum()
    if int(n) == 0:
        return logits.sum() * 0.0
    # Only the labelled rows go through log-softmax: the scored subset, in float32.
    picked = logits[mask].float()
    return F.cross_entropy(picked, labels[mask], reduction="sum") / n


@dataclass(frozen=True)
class TargetStats:
    """Per-dimension mean and variance of the training targets (the teacher's embeddings)."""

    mean: torch.Tensor  # (D,) float32
    var: torch.Tensor  # (D,) float32, population variance

    @classmethod
    def from_targets(cls, targets: torch.Tensor) -> TargetStats:
        t = targets.detach().double()
        if t.dim() != 2 or t.shape[0] < 2:
            raise ValueError(
                f"TargetStats need a (rows >= 2, dim) matrix of teacher embeddings; got shape "
                f"{tuple(targets.shape)}."
            )
        return cls(t.mean(0).float(), t.var(0, unbiased=False).float())

    @classmethod
    def from_moments(cls, n: int, total: torch.Tensor, total_sq: torch.Tensor) -> TargetStats:
        """From a row count and the per-dimension sums of x and x**2 (a streaming pass)."""
        if n < 2:
            raise ValueError(f"TargetStats need at least 2 rows, got {n}.")
        mean = total.double() / n
        var = (total_sq.double() / n - mean**2).clamp(min=0.0)
        return cls(mean.float(), var.float())

    @property
    def mean_vector_mse(self) -> float:
        """The MSE of always predicting ``mean`` (on the rows the stats came from)."""
        return float(self.var.double().mean())

    @property
    def zero_vector_mse(self) -> float:
        """The MSE of always predicting the zero vector."""
        return float((self.var.double() + self.mean.double() ** 2).mean())

    def to(self, device: torch.device | str) -> TargetStats:
        return TargetStats(self.mean.to(device), self.var.to(device))

    def as_lists(self) -> dict[str, list[float]]:
        return {"mean": self.mean.tolist(), "var": self.var.tolist()}

    @classmethod
    def from_lists(cls, d: dict[str, list[float]]) -> TargetStats:
        return cls(torch.tensor(d["mean"], dtype=torch.float32),
                   torch.tensor(d["var"], dtype=torch.float32))


AlignmentLoss = Callable[[torch.Tensor, torch.Tensor, "TargetStats | None"], torch.Tensor]
ALIGNMENT_LOSSES: Registry[AlignmentLoss] = Registry(
    "alignment loss", hint="Set train.align_loss to one of them (mse is the paper's)."
)
_EPS = 1e-12
VAR_FLOOR = 0.01  # standardized-mse: no dimension weighs more than 100x an average one


def _need(stats: TargetStats | None, kind: str) -> TargetStats:
    if stats is None:
        raise ValueError(
            f"alignment loss {kind!r} scales by the teacher targets' variance: pass "
            f"TargetStats.from_targets(training targets) (the trainer does this from the data)."
        )
    return stats


@ALIGNMENT_LOSSES.register("mse")
def _mse(student: torch.Tensor, teacher: torch.Tensor, stats: TargetStats | None) -> torch.Tensor:
    return F.mse_loss(student, teacher)


@ALIGNMENT_LOSSES.register("normalized-mse")
def _normalized_mse(
    student: torch.Tensor, teacher: torch.Tensor, stats: TargetStats | None
) -> torch.Tensor:
    var = _need(stats, "normalized-mse").var.to(student.device)
    return F.mse_loss(student, teacher) / var.mean().clamp(min=_EPS)


@ALIGNMENT_LOSSES.register("standardized-mse")
def _standardized_mse(
    student: torch.Tensor, teacher: torch.Tensor, stats: TargetStats | None
) -> torch.Tensor:
    var = _need(stats, "standardized-mse").var.to(student.device)
    floor = (var.mean() * VAR_FLOOR).clamp(min=_EPS)
    return (((student - teacher) ** 2) / var.clamp(min=floor)).mean()


@ALIGNMENT_LOSSES.register("cosine")
def _cosine(student: torch.Tensor, teacher: torch.Tensor, stats: TargetStats | None) -> torch.Tensor:
    return (1.0 - F.cosine_similarity(student, teacher, dim=-1, eps=1e-8)).mean()


def alignment_loss(
    student: torch.Tensor,
    teacher: torch.Tensor,
    *,
    kind: str = "mse",
    stats: TargetStats | None = None,
) -> torch.Tensor:
    """The ``kind`` alignment term between student (B, D) and teacher (B, D) embeddings."""
    if student.shape != teacher.shape:
        raise ValueError(
            f"Student embeddings {tuple(student.shape)} and teacher embeddings "
            f"{tuple(teacher.shape)} differ: model.teacher_dim must equal the teacher's dimension."
        )
    return ALIGNMENT_LOSSES.get(kind)(student.float(), teacher.float(), stats)


def combine_losses(
    recon: torch.Tensor | None,
    align: torch.Tensor | None,
    *,
    recon_weight: float = 1.0,
    align_weight: float = 1.0,
) -> dict[str, torch.Tensor | None]:
    """``{"loss", "recon_loss", "align_loss"}``; a missing term is None and left out of the total."""
    terms = [w * t for w, t in ((recon_weight, recon), (align_weight, align)) if t is not None]
    total = torch.stack(terms).sum() if terms else None
    return {"loss": total, "recon_loss": recon, "align_loss": align}
