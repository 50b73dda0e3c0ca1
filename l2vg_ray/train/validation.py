"""Held-out validation, and the references a run's alignment is judged against.

A run that learns nothing should be visible at a glance, so every evaluation puts the student's
held-out alignment MSE (raw MSE against the teacher's vectors, whatever ``train.align_loss``
optimises) next to three references computed once, on the same held-out rows:

- ``zero``: always predicting the zero vector;
- ``mean``: always predicting the training targets' mean vector (what a student that only learned
  the bias scores);
- ``probe``: a closed-form ridge regression from the frozen LLM's mean-pooled *query* states to
  the teacher's embedding of the *response*, fitted on ``train.probe_rows`` training rows: a
  linear read-out of what the untrained LLM already knows about the query.

Everything here is pure (tensors in, numbers out) except ``query_states``, which runs the LLM.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

if TYPE_CHECKING:
    from l2vg_ray.method import L2VGEncoder
    from l2vg_ray.method.losses import TargetStats
    from l2vg_ray.train.data import ValidationRows

RIDGE_LAMBDAS = (1.0, 10.0, 100.0, 1000.0, 10000.0)


@dataclass
class References:
    """Held-out MSE (and cosine) of the trivial predictors and the ridge probe."""

    val_rows: int
    zero_mse: float
    mean_mse: float
    mean_cos: float
    probe_mse: float | None = None
    probe_cos: float | None = None
    probe_rows: int = 0
    probe_lambda: float | None = None

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def mse_and_cos(pred: torch.Tensor, target: torch.Tensor) -> tuple[float, float]:
    """Mean squared error over all elements and mean row-wise cosine."""
    pred, target = pred.double(), target.double()
    mse = float(((pred - target) ** 2).mean())
    cos = float(torch.nn.functional.cosine_similarity(pred, target, dim=-1, eps=1e-12).mean())
    return mse, cos


def ridge_fit(x: torch.Tensor, y: torch.Tensor, lam: float):
    """Ridge regression on standardised features; returns ``predict(x) -> y``."""
    x, y = x.double(), y.double()
    mu, sd = x.mean(0), x.std(0).clamp(min=1e-6)
    xs = (x - mu) / sd
    y_mean = y.mean(0)
    eye = torch.eye(x.shape[1], dtype=x.dtype)
    w = torch.linalg.solve(xs.T @ xs + lam * eye, xs.T @ (y - y_mean))

    def predict(z: torch.Tensor) -> torch.Tensor:
        return ((z.double() - mu) / sd) @ w + y_mean

    return predict


def ridge_probe(
    train_x: torch.Tensor, train_y: torch.Tensor, val_x: torch.Tensor, val_y: torch.Tensor
) -> tuple[float, float, float]:
    """(held-out MSE, cosine, lambda) of a ridge probe. Lambda is chosen on a fifth of the
    training rows (never on the held-out rows), then the probe is refitted on all of them."""
    n = train_x.shape[0]
    if n < 10:
        raise ValueError(f"The ridge probe needs at least 10 training rows, got {n}.")
    cut = n - max(2, n // 5)
    best = min(
        RIDGE_LAMBDAS,
        key=lambda lam: mse_and_cos(
            ridge_fit(train_x[:cut], train_y[:cut], lam)(train_x[cut:]), train_y[cut:]
        )[0],
    )
    mse, cos = mse_and_cos(ridge_fit(train_x, train_y, best)(val_x), val_y)
    return mse, cos, best


def trivial_references(stats: TargetStats, val_teacher: torch.Tensor) -> References:
    """The zero- and mean-vector references on the held-out targets."""
    zero_mse, _ = mse_and_cos(torch.zeros_like(val_teacher), val_teacher)
    mean = stats.mean.to(val_teacher.dtype).expand_as(val_teacher)
    mean_mse, mean_cos = mse_and_cos(mean, val_teacher)
    return References(
        val_rows=int(val_teacher.shape[0]), zero_mse=zero_mse, mean_mse=mean_mse, mean_cos=mean_cos
    )


@torch.inference_mode()
def query_states(encoder: L2VGEncoder, queries: list[str], *, batch_size: int) -> torch.Tensor:
    """The frozen LLM's last hidden states mean-pooled over each query's own tokens (no special
    tokens): the input-centric features the ridge probe reads."""
    from l2vg_ray.method.model import left_pad, position_ids_from_mask

    room = encoder.config.max_length - len(encoder.special_token_ids)
    out = torch.zeros(len(queries), encoder.hidden_size)
    ids = encoder.tokenizer(list(queries), add_special_tokens=True)["input_ids"]
    ids = [list(x[:room]) or [encoder.eos_token_id] for x in ids]
    order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
    for s in range(0, len(order), batch_size):
        idx = order[s : s + batch_size]
        t_ids, mask = left_pad([ids[i] for i in idx], encoder.pad_token_id)
        t_ids, mask = t_ids.to(encoder.device), mask.to(encoder.device)
        hidden = encoder.llm.base_model(
            input_ids=t_ids, attention_mask=mask, position_ids=position_ids_from_mask(mask),
            use_cache=False,
        ).last_hidden_state.float()
        m = mask.unsqueeze(-1).to(hidden.dtype)
        out[idx] = ((hidden * m).sum(1) / m.sum(1).clamp(min=1.0)).cpu()
    return out


def probe_reference(
    encoder: L2VGEncoder,
    refs: References,
    train_queries: list[str],
    train_teacher: np.ndarray,
    val: ValidationRows,
    *,
    batch_size: int,
) -> References:
    """``refs`` with the ridge probe filled in (runs the LLM over the probe and held-out rows)."""
    if len(train_queries) < 10 or len(val) == 0:
        return refs
    x = query_states(encoder, list(train_queries) + list(val.queries), batch_size=batch_size)
    n = len(train_queries)
    mse, cos, lam = ridge_probe(
        x[:n], torch.tensor(train_teacher), x[n:], torch.tensor(val.teacher)
    )
    return References(**{**refs.as_dict(), "probe_mse": mse, "probe_cos": cos,
                         "probe_rows": n, "probe_lambda": lam})


@torch.inference_mode()
def heldout_metrics(
    encoder: L2VGEncoder,
    rows: ValidationRows,
    *,
    batch_size: int,
    recon_weight: float,
    align_loss: str,
    target_stats: TargetStats | None,
) -> dict[str, float]:
    """Held-out metrics: raw alignment MSE and cosine, the configured alignment loss, and the
    token-weighted reconstruction loss (skipped when ``recon_weight`` is 0)."""
    if len(rows) == 0:
        return {}
    was_training = encoder.training
    encoder.eval()
    preds, recon_sum, tokens, align_sum = [], 0.0, 0, 0.0
    try:
        for s in range(0, len(rows), batch_size):
            sl = slice(s, s + batch_size)
            batch = encoder.prepare_batch(
                rows.queries[sl], rows.responses[sl] if recon_weight else None,
                torch.tensor(rows.teacher[sl]),
            )
            out = encoder(
                batch, recon_weight=recon_weight, align_weight=1.0, align_loss=align_loss,
                target_stats=target_stats,
            )
            preds.append(out.embeddings.float().cpu())
            n = len(rows.queries[sl])
            align_sum += float(out.align_loss) * n
            if out.recon_loss is not None:
                k = int(out.n_response_tokens)
                recon_sum += float(out.recon_loss) * k
                tokens += k
    finally:
        encoder.train(was_training)
    mse, cos = mse_and_cos(torch.cat(preds), torch.tensor(rows.teacher))
    metrics = {"val_align_mse": mse, "val_align_cos": cos, "val_align_loss": align_sum / len(rows)}
    metrics["val_recon_loss"] = recon_sum / tokens if tokens else math.nan
    return metrics
