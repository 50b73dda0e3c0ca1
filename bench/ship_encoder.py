"""Ship a trained encoder as a packaged name: copy its trainable state into the package.

    python bench/ship_encoder.py [--run outputs/laptop] [--name l2vg-smollm2-135m-laptop]
                                 [--quality bench/results/quality.json]

Copies ``<run>/train/final`` (``l2vg_config.json`` + ``trainable.safetensors``, ~2 MB; the frozen
LLM is itself a packaged model) to ``l2vg_ray/resources/encoders/<name>/`` and writes
``recipe.json`` beside it: the config file and the stage config hashes of the run
(``_SUCCESS.json`` of each stage), the data it trained on, its held-out validation against the
references, the loss of its first 200 steps (``bench/reproduce.py --steps`` compares them), the
stage wall times, its offline scores and the quality benchmark's, and the
package versions - what a rerun of the recipe must reproduce. An existing packaged encoder is
only replaced with ``--force``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import sys
from pathlib import Path

from _common import ROOT

# quality.json row -> the targets it is judged by (bench/quality.py)
TARGETS = {"student": "targets", "student-unsup": "paper_targets"}
FIRST_STEPS = 200  # per-step losses kept in the recipe: what bench/reproduce.py --steps compares


def step_losses(metrics_csv: Path) -> dict[int, float]:
    """{step: training loss} from a run's ``metrics.csv`` (empty without one)."""
    if not metrics_csv.is_file():
        return {}
    from l2vg_ray.train.metrics import read_metrics_csv

    return {int(r["step"]): r["loss"] for r in read_metrics_csv(metrics_csv)
            if r["loss"] == r["loss"]}  # rows without a loss (validation-only) are NaN


def first_losses(metrics_csv: Path, n: int = FIRST_STEPS) -> list[float] | None:
    """The training loss of steps 1..n from the run's ``metrics.csv`` (None without one)."""
    if not metrics_csv.is_file():
        return None
    by_step = step_losses(metrics_csv)
    return [by_step[s] for s in range(1, n + 1) if s in by_step]


def _read(path: Path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--run", default=str(ROOT / "outputs" / "laptop"))
    p.add_argument("--config", default="configs/laptop.yaml")
    p.add_argument("--name", default="l2vg-smollm2-135m-laptop")
    p.add_argument("--quality", default=str(ROOT / "bench" / "results" / "quality.json"))
    p.add_argument("--label", default="student", choices=TARGETS,
                   help="its row in the quality benchmark")
    p.add_argument("--force", action="store_true", help="replace an existing packaged encoder")
    args = p.parse_args()

    from l2vg_ray.dataset import package_versions
    from l2vg_ray.models.resolver import packaged_encoder_dir
    from l2vg_ray.pipeline import config_file_hashes

    run = Path(args.run)
    final = run / "train" / "final"
    if not (final / "l2vg_config.json").is_file():
        p.error(f"{final} holds no trained encoder: run `l2vg run --config {args.config}` first.")
    dest = packaged_encoder_dir(args.name)
    if dest.exists() and not args.force:
        p.error(f"{dest} exists; pass --force to replace it.")
    stages = {s: _read(run / d / "_SUCCESS.json") for s, d in
              (("generate", "data"), ("train", "train"), ("eval", "eval"))}
    # a stage run on its own (l2vg train, not l2vg run) has no marker: its summary file then
    train = stages["train"].get("summary") or _read(run / "train" / "train_summary.json")
    evaluation = stages["eval"].get("summary") or {}
    manifest = _read(run / "data" / "manifest.json")
    computed = config_file_hashes(args.config)
    quality = _read(Path(args.quality))
    weights = (final / "trainable.safetensors").read_bytes()
    recipe = {
        "name": args.name,
        "config": args.config,
        # a stage run on its own has no marker: its hash is then computed from the config file
        "config_hashes": {s: m.get("config_hash") or computed[s] for s, m in stages.items()},
        "stage_seconds": {s: m.get("seconds") for s, m in stages.items()},
        "trainable_sha256": hashlib.sha256(weights).hexdigest(),
        "fingerprint": json.loads((final / "l2vg_config.json").read_text()).get("fingerprint"),
        "data": {k: manifest.get(k) for k in ("rows", "queries", "query_stats", "generator_model",
                                               "teacher_model", "teacher_dim", "sampling_params",
                                               "backend", "generated_tokens", "wall_s",
                                               "passes")},
        "train": {**{k: train.get(k) for k in ("steps", "global_batch", "rows", "fit_time_s",
                                               "first_loss", "final_loss", "references",
                                               "validation")},
                  "first_losses": first_losses(run / "train" / "metrics.csv")},
        "offline_suite": {k: evaluation.get(k) for k in ("max_docs", "mean_main_score",
                                                         "mean_by_type", "scores")},
        "quality_benchmark": (
            {args.label: quality["models"][args.label],
             "targets": quality.get(TARGETS[args.label])}
            if quality.get("models", {}).get(args.label) else None),
        "versions": package_versions(),
    }
    if dest.exists():
        shutil.rmtree(dest)
    dest.mkdir(parents=True)
    for f in ("l2vg_config.json", "trainable.safetensors"):
        shutil.copy2(final / f, dest / f)
    meta = json.loads((dest / "l2vg_config.json").read_text())
    if "objective" not in meta:  # trained before encoders recorded it: take it from the run
        t = (stages["train"].get("config") or {}).get("train") or {}
        if {"recon_weight", "align_weight", "align_loss"} <= set(t):
            meta["objective"] = {"recon_weight": float(t["recon_weight"]),
                                 "align_weight": float(t["align_weight"]),
                                 "align_loss": str(t["align_loss"])}
            (dest / "l2vg_config.json").write_text(json.dumps(meta, indent=2) + "\n")
    (dest / "recipe.json").write_text(json.dumps(recipe, indent=2, default=str) + "\n")
    size = sum(f.stat().st_size for f in dest.iterdir())
    print(f"shipped {final} as {args.name!r} -> {dest} ({size / 1e6:.2f} MB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
