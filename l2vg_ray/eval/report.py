"""One results table per evaluation: JSON + CSV + Markdown + a PNG bar chart per task type."""

from __future__ import annotations

import csv
import json
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

COLUMNS = ("task", "type", "status", "main_score", "metric", "seconds", "n_encoded", "n_cached", "error")


def _fmt(v: Any) -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        return f"{v:.4f}"
    return str(v).replace("|", "\\|").replace("\n", " ")


def summarize(rows: Sequence[dict]) -> dict[str, Any]:
    """Mean main score per task type and over all finished tasks (scores in [0, 1], mteb's scale)."""
    ok = [r for r in rows if r.get("status") == "ok" and r.get("main_score") is not None]
    by_type: dict[str, list[float]] = {}
    for r in ok:
        by_type.setdefault(str(r["type"]), []).append(float(r["main_score"]))
    return {
        "n_tasks": len(rows),
        "n_ok": len(ok),
        "n_failed": sum(1 for r in rows if r.get("status") == "failed"),
        "n_missing": sum(1 for r in rows if r.get("status") == "missing"),
        "mean_main_score": sum(float(r["main_score"]) for r in ok) / len(ok) if ok else None,
        "mean_by_type": {t: sum(v) / len(v) for t, v in sorted(by_type.items())},
    }


def markdown_table(rows: Sequence[dict], *, title: str | None = None) -> str:
    cols = [c for c in COLUMNS if c != "error" or any(r.get("error") for r in rows)]
    lines = [f"### {title}", ""] if title else []
    lines.append("| " + " | ".join(cols) + " |")
    lines.append("|" + "|".join("---" for _ in cols) + "|")
    for r in rows:
        lines.append("| " + " | ".join(_fmt(r.get(c)) for c in cols) + " |")
    s = summarize(rows)
    if s["mean_main_score"] is not None:
        per_type = ", ".join(f"{t} {v:.4f}" for t, v in s["mean_by_type"].items())
        lines += ["", f"Mean main score over {s['n_ok']} tasks: {s['mean_main_score']:.4f} ({per_type})"]
    if s["n_failed"]:
        lines.append(f"{s['n_failed']} task(s) failed.")
    if s["n_missing"]:
        lines.append(f"{s['n_missing']} task(s) did not run: their data could not be fetched "
                     "(see the error column for the package and the fix; `l2vg data` lists all).")
    return "\n".join(lines)


def _slug(s: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", s)


def plot_by_type(rows: Sequence[dict], out_dir: Path, *, title: str) -> list[Path]:
    """One bar chart (main score per task) per task type; returns the PNG paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    by_type: dict[str, list[dict]] = {}
    for r in rows:
        if r.get("status") == "ok" and r.get("main_score") is not None:
            by_type.setdefault(str(r["type"]), []).append(r)
    for task_type, items in sorted(by_type.items()):
        fig, ax = plt.subplots(figsize=(max(4.0, 1.2 * len(items) + 2), 3.5))
        names = [str(r["task"]) for r in items]
        values = [float(r["main_score"]) for r in items]
        bars = ax.bar(range(len(items)), values, color="tab:blue")
        ax.bar_label(bars, labels=[f"{v:.3f}" for v in values], fontsize=8)
        ax.set_xticks(range(len(items)), names, rotation=20, ha="right", fontsize=8)
        ax.set_ylabel(", ".join(sorted({str(r["metric"]) for r in items})))
        ax.set_ylim(0, max(1.0, max(values) * 1.1))
        ax.set_title(f"{title} - {task_type}", fontsize=10)
        fig.tight_layout()
        path = out_dir / f"scores_{_slug(task_type)}.png"
        fig.savefig(path, dpi=100)
        plt.close(fig)
        paths.append(path)
    return paths


def write_report(rows: Sequence[dict], out_dir: str | Path, *, meta: dict[str, Any]) -> dict[str, str]:
    """Write results.json / results.csv / results.md / scores_<type>.png into ``out_dir``."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    summary = summarize(rows)
    (out_dir / "results.json").write_text(
        json.dumps({**meta, "summary": summary, "results": list(rows)}, indent=2, default=str)
    )
    with (out_dir / "results.csv").open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(COLUMNS), extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
    title = str(meta.get("model", "encoder"))
    (out_dir / "results.md").write_text(markdown_table(rows, title=f"{title} on {meta.get('suite')}") + "\n")
    pngs = plot_by_type(rows, out_dir, title=title)
    return {
        "json": str(out_dir / "results.json"),
        "csv": str(out_dir / "results.csv"),
        "markdown": str(out_dir / "results.md"),
        "png": [str(p) for p in pngs],
    }
