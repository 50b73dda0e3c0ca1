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


def plot_curves(rows: Sequence[dict[str, float]], path: str | Path, *, title: str = "") -> Path:
    """Losses (left) and learning rate (right) against the optimiser step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    steps = [r["step"] for r in rows]
    fig, (ax_loss, ax_lr) = plt.subplots(1, 2, figsize=(10, 4))
    for key, label in (("loss", "total"), ("recon_loss", "reconstruction"), ("align_loss", "alignment")):
        values = [r.get(key, math.nan) for r in rows]
        if any(not math.isnan(v) for v in values):
            ax_loss.plot(steps, values, label=label)
    ax_loss.set_xlabel("step")
    ax_loss.set_ylabel("loss")
    ax_loss.set_yscale("log")
    ax_loss.legend()
    ax_lr.plot(steps, [r.get("lr", math.nan) for r in rows], color="tab:green")
    ax_lr.set_xlabel("step")
    ax_lr.set_ylabel("learning rate")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
