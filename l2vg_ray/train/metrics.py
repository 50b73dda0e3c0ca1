"""Training curves: ``metrics.csv`` and ``curves.png`` (losses and learning rate per step)."""

from __future__ import annotations

import csv
import math
from collections.abc import Sequence
from pathlib import Path

CURVE_COLUMNS = (
    "step",
    "epoch",
    "loss",
    "recon_loss",
    "align_loss",
    "lr",
    "grad_norm",
    "examples_per_s",
    "tokens_per_s",
    "step_time_s",
    "time",
    "val_align_mse",
    "val_align_cos",
    "val_align_loss",
    "val_recon_loss",
)


def write_metrics_csv(rows: Sequence[dict[str, float]], path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(CURVE_COLUMNS), extrasaction="ignore")
        writer.writeheader()
        for row in rows:
            writer.writerow({k: row.get(k, "") for k in CURVE_COLUMNS})
    return path


def read_metrics_csv(path: str | Path) -> list[dict[str, float]]:
    with Path(path).open() as f:
        return [
            {k: (float(v) if v not in ("", None) else math.nan) for k, v in row.items()}
            for row in csv.DictReader(f)
        ]


def plot_curves(
    rows: Sequence[dict[str, float]],
    path: str | Path,
    *,
    title: str = "",
    references: dict | None = None,
) -> Path:
    """Training losses, held-out alignment MSE against its references, and the learning rate.

    The middle panel shows the student's held-out alignment MSE with the zero-vector,
    mean-vector and ridge-probe references as horizontal lines (``validation.References``): a
    student that learns nothing stays on the mean-vector line.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    train_rows = [r for r in rows if not math.isnan(r.get("loss", math.nan))]
    steps = [r["step"] for r in train_rows]
    fig, (ax_loss, ax_val, ax_lr) = plt.subplots(1, 3, figsize=(15, 4))
    for key, label in (("loss", "total"), ("recon_loss", "reconstruction"), ("align_loss", "alignment")):
        values = [r.get(key, math.nan) for r in train_rows]
        if any(not math.isnan(v) for v in values):
            ax_loss.plot(steps, values, label=label)
    ax_loss.set_xlabel("step")
    ax_loss.set_ylabel("training loss")
    ax_loss.set_yscale("log")
    ax_loss.legend()
    val = [r for r in rows if not math.isnan(r.get("val_align_mse", math.nan))]
    if val:
        ax_val.plot([r["step"] for r in val], [r["val_align_mse"] for r in val], "o-",
                    color="tab:blue", label="student (held out)")
    refs = references or {}
    for key, label, color in (("zero_mse", "zero vector", "tab:gray"),
                              ("mean_mse", "mean vector", "tab:red"),
                              ("probe_mse", "ridge probe (query states)", "tab:green")):
        if refs.get(key) is not None:
            ax_val.axhline(refs[key], linestyle="--", color=color, label=label)
    ax_val.set_xlabel("step")
    ax_val.set_ylabel("held-out alignment MSE")
    if val or refs:
        ax_val.legend(fontsize=8)
    ax_lr.plot(steps, [r.get("lr", math.nan) for r in train_rows], color="tab:green")
    ax_lr.set_xlabel("step")
    ax_lr.set_ylabel("learning rate")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
