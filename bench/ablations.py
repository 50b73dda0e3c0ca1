"""Ablations of the laptop recipe: one training run per variant, one line of results each.

    python bench/ablations.py [--steps 300] [--max-docs 200] [--only both,align-only]
    nohup python bench/ablations.py > logs/ablations.log 2>&1 &     # resumable: rerun to continue
    python bench/ablations.py --config configs/laptop-unsup.yaml --data outputs/laptop-unsup/data \
        --steps 1000 --only align-only,align-only-batch-32 --quality-suite --max-docs 300 \
        --prefix ablation1000-unsup- --out bench/results/ablations_1000_unsup \
        eval.max_length=256 eval.strict_data=true

Every variant trains on the laptop recipe's generated data (``outputs/laptop/data``: generate it
first with ``l2vg generate --config configs/laptop.yaml``) with ``--steps`` optimiser steps and
is evaluated on the offline suite at ``--max-docs`` (with ``--quality-suite`` as
``bench/quality.py`` scores, so the rows compare with quality.json's: all 1379 STS-B pairs,
``--max-docs`` elsewhere). Each is an ordinary ``run_pipeline`` under its own name
(``outputs/<prefix><variant>``), so a finished variant is skipped and an interrupted one resumes
from its last checkpoint. Trailing overrides apply to every variant. Writes ``bench/results/ablations.json`` and
``ablations.md``: per variant the suite average, the per-type means and the held-out alignment
MSE next to the mean-vector and ridge-probe references.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from _common import ROOT

# name -> (what it tests, config overrides on top of configs/laptop.yaml)
VARIANTS: dict[str, tuple[str, list[str]]] = {
    "both": ("the recipe (reconstruction + alignment)", []),
    "recon-only": ("reconstruction only (alignment head left at its start)", ["train.align_weight=0"]),
    "align-only": ("alignment only (no decoder pass)", ["train.recon_weight=0"]),
    "batch-32": ("global batch 32 instead of 8", ["train.batch_size=32"]),
    "align-only-batch-32": ("alignment only, global batch 32",
                            ["train.recon_weight=0", "train.batch_size=32"]),
    "tokens-1+1": ("2 special tokens", ["model.n_thought=1", "model.n_compression=1"]),
    "tokens-5+5": ("10 special tokens", ["model.n_thought=5", "model.n_compression=5"]),
    "tokens-0+10": ("0 + 10 tokens (the paper's current version)", ["model.n_thought=0"]),
    "loss-mse": ("raw MSE, weights 1.0/1.0 (the paper's term)", ["train.align_loss=mse"]),
    "loss-standardized": ("per-dimension standardised MSE", ["train.align_loss=standardized-mse"]),
    "loss-cosine": ("1 - cosine", ["train.align_loss=cosine"]),
    "rows-1k": ("1000 training rows instead of all", ["train.max_rows=1000"]),
    "init-paper": ("the paper's starts: mean token init, default heads, one lr",
                   ["model.token_init_text=null", "train.head_init=default", "train.lr_heads=null"]),
    "no-templates": ("questions and instructions only (no summarise / restate queries)", [
        f"generate.output_dir={ROOT / 'outputs' / 'laptop-v1' / 'data'}",
        "generate.queries.parts=[{source: sharegpt, max_query_tokens: 80, limit: 2000},"
        " {source: pyserini, path: topics.msmarco-passage.dev-subset.txt, limit: 2000},"
        " {source: pyserini, path: topics.dpr.nq.test.txt, limit: 1000},"
        " {source: pyserini, path: topics.dpr.trivia.dev.txt, limit: 1000}]",
    ]),
}


def quality_suite_eval(args):
    """An eval stage that scores as bench/quality.py does (STS-B whole, --max-docs elsewhere)."""
    import quality

    def run(cfg) -> dict:
        from l2vg_ray.eval.suites import suite_task_names

        names = suite_task_names(cfg)
        scores = quality.score_suite(args.config, cfg.eval.model, names, args.max_docs,
                                     Path(cfg.eval.output_dir), list(args.overrides))
        return {"mean_main_score": quality.suite_mean(scores),
                "mean_by_type": quality.type_means(scores),
                "scores": {n: scores[n]["score"] for n in names},
                "failed": {n: r["status"] for n, r in scores.items() if r["status"] == "failed"}}

    return run


def run_variant(name: str, overrides: list[str], args) -> dict:
    from l2vg_ray.config import load_config
    from l2vg_ray.pipeline import run_pipeline

    cfg = load_config(args.config, [
        f"name={args.prefix}{name}",
        f"output_dir={ROOT / 'outputs' / f'{args.prefix}{name}'}",
        f"generate.output_dir={args.data}",
        f"train.max_steps={args.steps}",
        f"train.eval_every={args.steps}",
        f"train.checkpoint_every={max(50, args.steps // 3)}",
        f"eval.max_docs={args.max_docs}",
        *(["eval.suite=offline"] if args.quality_suite else []),
        *args.overrides,
        *overrides,
    ])
    t0 = time.perf_counter()
    result = run_pipeline(cfg, runners={"eval": quality_suite_eval(args)} if args.quality_suite
                          else None)
    train = result["stages"]["train"]["summary"] or {}
    ev = result["stages"]["eval"]["summary"] or {}
    val = (train.get("validation") or [{}])[-1]
    return {
        "variant": name,
        "overrides": overrides,
        "suite_mean": ev.get("mean_main_score"),
        "by_type": ev.get("mean_by_type"),
        "scores": ev.get("scores"),
        "val_align_mse": val.get("val_align_mse"),
        "val_align_cos": val.get("val_align_cos"),
        "val_recon_loss": val.get("val_recon_loss"),
        "references": train.get("references"),
        "train_s": result["stages"]["train"].get("seconds"),
        "wall_s": round(time.perf_counter() - t0, 1),
    }


def markdown(rows: list[dict], args) -> str:
    types = sorted({t for r in rows for t in (r.get("by_type") or {})})
    sts = " (STS-B: all 1379 pairs)" if args.quality_suite else ""
    lines = [f"# Ablations of `{Path(args.config).name}` ({args.steps} steps each, offline suite at "
             f"max_docs={args.max_docs}{sts})", "",
             "| variant | what | suite mean | " + " | ".join(types) + " | held-out align MSE | train s |",
             "|---|---|---|" + "---|" * len(types) + "---|---|"]
    for r in rows:
        bt = r.get("by_type") or {}
        mse = r.get("val_align_mse")
        lines.append(
            f"| {r['variant']} | {VARIANTS[r['variant']][0]} | "
            f"{'' if r['suite_mean'] is None else format(r['suite_mean'], '.3f')} | "
            + " | ".join(f"{bt[t]:.3f}" if t in bt else "" for t in types)
            + f" | {'' if mse is None else format(mse, '.5f')} | {r.get('train_s') or ''} |")
    refs = next((r["references"] for r in rows if r.get("references")), None)
    if refs:
        lines += ["", f"Held-out references ({refs.get('val_rows')} rows): mean vector "
                  f"{refs.get('mean_mse', float('nan')):.5f}, zero vector "
                  f"{refs.get('zero_mse', float('nan')):.5f}, ridge probe on the LLM's mean-pooled "
                  f"query states {refs.get('probe_mse') or float('nan'):.5f}."]
    return "\n".join(lines) + "\n"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default=str(ROOT / "configs" / "laptop.yaml"))
    p.add_argument("--data", default=str(ROOT / "outputs" / "laptop" / "data"))
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--max-docs", type=int, default=200)
    p.add_argument("--only", default="", help="comma-separated variant names (default: all)")
    p.add_argument("--out", default=str(ROOT / "bench" / "results" / "ablations"))
    p.add_argument("--prefix", default="ablation-", help="each variant runs in outputs/<prefix><variant>")
    p.add_argument("--quality-suite", action="store_true",
                   help="score as bench/quality.py does: all 1379 STS-B pairs, --max-docs elsewhere")
    p.add_argument("overrides", nargs="*", help="config overrides for every variant (eval.max_length=256)")
    args = p.parse_args()

    from l2vg_ray.config import load_config
    from l2vg_ray.ray_utils import init_ray

    names = [n for n in (args.only.split(",") if args.only else VARIANTS) if n]
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        p.error(f"unknown variants {unknown}; known: {', '.join(VARIANTS)}")
    init_ray(load_config(args.config).cluster, log_to_driver=False)
    out = Path(args.out)
    done = {}
    if out.with_suffix(".json").is_file():
        done = {r["variant"]: r for r in json.loads(out.with_suffix(".json").read_text())["runs"]}
    for name in names:
        print(f"=== ablation {name}: {VARIANTS[name][0]}", flush=True)
        done[name] = run_variant(name, VARIANTS[name][1], args)
        rows = [done[n] for n in VARIANTS if n in done]
        out.parent.mkdir(parents=True, exist_ok=True)
        out.with_suffix(".json").write_text(json.dumps(
            {"steps": args.steps, "max_docs": args.max_docs, "config": args.config,
             "quality_suite": args.quality_suite, "overrides": args.overrides,
             "command": "python bench/ablations.py " + " ".join(sys.argv[1:]), "runs": rows},
            indent=2, default=str) + "\n")
        out.with_suffix(".md").write_text(markdown(rows, args))
        print(markdown(rows, args), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
