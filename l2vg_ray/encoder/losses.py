"""LLM2Vec-Gen training losses: pure functions on tensors, returning named terms.

- ``reconstruction_loss``: next-token cross-entropy of the frozen LLM on the response tokens only
  (positions labelled ``IGNORE_INDEX`` contribute nothing, not even to the mean's denominator).
- ``alignment_loss``: MSE between the student embedding (mean over compression positions) and
  the teacher's embedding of the response.
- ``combine_losses``: the weighted total plus both terms by name.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

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


def alignment_loss(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """MSE between student (B, D) and teacher (B, D) embeddings, averaged over all elements."""
    if student.shape != teacher.shape:
        raise ValueError(
            f"Student embeddings {tuple(student.shape)} and teacher embeddings "
            f"{tuple(teacher.shape)} differ: model.teacher_dim must equal the teacher's dimension."
        )
    return F.mse_loss(student.float(), teacher.float())


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
