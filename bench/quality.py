"""Benchmark: does the method work? The laptop students against every baseline, offline suite.

    python bench/quality.py [--config configs/laptop.yaml] [--student l2vg-smollm2-135m-laptop]
                            [--models mean-pool,last-token,teacher] [--gte-max-docs 100] [--quick]
    python bench/quality.py --keep --add student-unsup=outputs/laptop-unsup/train/final@configs/laptop-unsup.yaml \
                            --add teacher-unsup=teacher@configs/laptop-unsup.yaml ...

Two settings share the table: distillation (``student`` from all-MiniLM-L6-v2, the ``teacher``)
and the paper's (``student-unsup`` from an unsupervised teacher of SmolLM2 itself,
``teacher-unsup``), with ``mean-pool`` and ``last-token`` as baselines. ``--add LABEL=SPEC@CONFIG``
evaluates one model under its own config; ``--keep`` keeps the rows already in quality.json (same
suite and sizes), so a model is added when it is ready.

Every model runs through the project's own evaluation path (``run_eval``: one Ray task per
task, the SQLite embedding cache under ``<cache_dir>/embeddings``), at sizes where the scores
are stable: all 1379 STS-B test pairs, ``--max-docs`` (500) texts per split elsewhere (the
classification tasks run mteb's 10 repeated experiments of 16 examples per label). The
generate-then-encode baseline generates a response for every text, so it runs at
``--gte-max-docs`` with the student and mean-pool beside it at that size.

Writes ``bench/results/quality.json``, ``quality.md`` and ``quality.png`` (student vs baselines,
per task and per task type), and prints the targets of the "Show that the method works" issue:
the student's share of the (teacher - mean-pool) gap on the suite and on STS, retrieval and
clustering (target 60%), and student >= mean-pool on every other task type.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

from _common import ROOT

STS_TASK = "OfflineSTSBenchmark"
STS_PAIRS = 1379  # the whole STS-B test split
GAP_TARGET = 0.6
GAP_TYPES = ("STS", "Retrieval", "Clustering")  # where the input-centric baseline is weakest


def evaluate(cfg_path: str, model: str, tasks: list[str], max_docs: int, work: Path,
             extra: list[str]) -> dict[str, dict]:
    """``run_eval`` of ``model`` on ``tasks`` at ``max_docs``; {task: result row}."""
    from l2vg_ray.config import load_config
    from l2vg_ray.eval.runner import run_eval

    cfg = load_config(cfg_path, [
        f"eval.model={model}", "eval.suite=list", f"eval.tasks=[{','.join(tasks)}]",
        f"eval.max_docs={max_docs}", f"eval.output_dir={work / f'n{max_docs}'}",
        "eval.overwrite=false", *extra,
    ])
    t0 = time.perf_counter()
    summary = run_eval(cfg)
    rows = json.loads(Path(summary["files"]["json"]).read_text())["results"]
    out = {}
    for r in rows:
        out[r["task"]] = {"type": r["type"], "score": r["main_score"], "metric": r["metric"],
                          "status": r["status"], "max_docs": max_docs}
    print(f"  {model} @ max_docs={max_docs}: {time.perf_counter() - t0:.0f}s", flush=True)
    return out


def score_suite(cfg_path: str, model: str, names: list[str], max_docs: int, work: Path,
                extra: list[str], *, sts_docs: int = STS_PAIRS) -> dict[str, dict]:
    """``model`` on the suite's tasks ``names`` as this benchmark scores it: STS-B at ``sts_docs``
    pairs (all of them), every other task at ``max_docs``; {task: result row} in ``names`` order."""
    scores = evaluate(cfg_path, model, [STS_TASK], sts_docs, work, extra)
    scores.update(evaluate(cfg_path, model, [n for n in names if n != STS_TASK], max_docs, work,
                           extra))
    return {n: scores[n] for n in names}


def type_means(scores: dict[str, dict]) -> dict[str, float]:
    by: dict[str, list[float]] = {}
    for r in scores.values():
        if r["score"] is not None:
            by.setdefault(r["type"], []).append(float(r["score"]))
    return {t: sum(v) / len(v) for t, v in sorted(by.items())}


def suite_mean(scores: dict[str, dict]) -> float | None:
    vals = [float(r["score"]) for r in scores.values() if r["score"] is not None]
    return sum(vals) / len(vals) if vals else None


def gap_share(student: float, low: float, high: float) -> float | None:
    """Fraction of the (high - low) gap the student closes; None when there is no gap."""
    return None if abs(high - low) < 1e-9 else (student - low) / (high - low)


def targets(models: dict[str, dict]) -> dict:
    s, mp, te = models["student"], models["mean-pool"], models["teacher"]
    out = {"suite": {}, "by_type": {}, "passed": True}
    share = gap_share(s["mean"], mp["mean"], te["mean"])
    out["suite"] = {"student": s["mean"], "mean_pool": mp["mean"], "teacher": te["mean"],
                    "gap_closed": share, "target": GAP_TARGET,
                    "met": share is not None and share >= GAP_TARGET}
    out["passed"] &= out["suite"]["met"]
    for t, sv in s["by_type"].items():
        lo, hi = mp["by_type"].get(t), te["by_type"].get(t)
        if lo is None or hi is None:
            continue
        if t in GAP_TYPES:
            share = gap_share(sv, lo, hi)
            met = share is not None and share >= GAP_TARGET if hi > lo else sv >= lo
            out["by_type"][t] = {"student": sv, "mean_pool": lo, "teacher": hi,
                                 "gap_closed": share, "target": f">= {GAP_TARGET:.0%} of the gap",
                                 "met": met}
        else:
            out["by_type"][t] = {"student": sv, "mean_pool": lo, "teacher": hi,
                                 "target": ">= mean-pool", "met": sv >= lo}
        out["passed"] &= out["by_type"][t]["met"]
    out["stretch_student_beats_teacher"] = s["mean"] >= te["mean"]
    return out


PAPER_RATIO = 1.05  # the paper: +9.3% over the unsupervised teacher on MTEB
PAPER_MIN_TYPES = 5  # of the six task types, at least this many >= the teacher


def paper_targets(models: dict[str, dict]) -> dict:
    """The paper's claim: the student beats its unsupervised teacher (suite mean and by type)."""
    s, te = models["student-unsup"], models["teacher-unsup"]
    ratio = s["mean"] / te["mean"] if te["mean"] else None
    types = {t: {"student": v, "teacher": te["by_type"][t], "met": v >= te["by_type"][t]}
             for t, v in s["by_type"].items() if t in te["by_type"]}
    n_met = sum(v["met"] for v in types.values())
    return {"suite": {"student": s["mean"], "teacher": te["mean"], "ratio": ratio,
                      "target": PAPER_RATIO, "met": ratio is not None and ratio >= PAPER_RATIO},
            "by_type": types, "types_met": n_met, "types_target": PAPER_MIN_TYPES,
            "passed": (ratio or 0) >= PAPER_RATIO and n_met >= PAPER_MIN_TYPES}


def markdown(result: dict) -> str:
    models = result["models"]
    names = list(models)
    tasks = list(next(iter(models.values()))["scores"])
    lines = ["# Offline suite: the laptop student against the baselines", "",
             f"STS-B on all {STS_PAIRS} test pairs; the other tasks at max_docs="
             f"{result['max_docs']}. Main score per task (mteb's scale, 0-1).", "",
             "| task | type | " + " | ".join(names) + " |",
             "|---|---|" + "---|" * len(names)]
    for t in tasks:
        typ = models[names[0]]["scores"][t]["type"]
        cells = [models[m]["scores"].get(t, {}).get("score") for m in names]
        lines.append(f"| {t} | {typ} | " + " | ".join("" if c is None else f"{c:.3f}" for c in cells) + " |")
    lines.append("| **mean** | | " + " | ".join(f"**{models[m]['mean']:.3f}**" for m in names) + " |")
    types = sorted({typ for m in names for typ in models[m]["by_type"]})
    lines += ["", "| task type | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    for typ in types:
        lines.append(f"| {typ} | " + " | ".join(
            f"{models[m]['by_type'].get(typ, float('nan')):.3f}" for m in names) + " |")
    tg = result["targets"]
    lines += ["", "## Targets", "",
              f"- Suite: student {tg['suite']['student']:.3f}, mean-pool {tg['suite']['mean_pool']:.3f}, "
              f"teacher {tg['suite']['teacher']:.3f}: **{_pct(tg['suite']['gap_closed'])} of the gap** "
              f"(target {GAP_TARGET:.0%}) - {'met' if tg['suite']['met'] else 'missed'}."]
    for typ, v in tg["by_type"].items():
        what = (f"{_pct(v['gap_closed'])} of the gap" if "gap_closed" in v
                else f"student {v['student']:.3f} vs mean-pool {v['mean_pool']:.3f}")
        lines.append(f"- {typ}: {what} (target {v['target']}) - {'met' if v['met'] else 'missed'}.")
    lines.append(f"- Stretch (student >= teacher on the suite): "
                 f"{'met' if tg['stretch_student_beats_teacher'] else 'missed'}.")
    if result.get("paper_targets"):
        pt = result["paper_targets"]
        lines += ["", "## The paper's claim: student-unsup against its unsupervised teacher", "",
                  f"- Suite: student-unsup {pt['suite']['student']:.3f}, teacher-unsup "
                  f"{pt['suite']['teacher']:.3f}: **{pt['suite']['ratio']:.3f}x** (target "
                  f">= {PAPER_RATIO}x) - {'met' if pt['suite']['met'] else 'missed'}.",
                  f"- Task types where student-unsup >= teacher-unsup: **{pt['types_met']} of "
                  f"{len(pt['by_type'])}** (target >= {PAPER_MIN_TYPES}): "
                  + ", ".join(f"{t} {v['student']:.3f} vs {v['teacher']:.3f}"
                              for t, v in pt["by_type"].items()) + "."]
    if result.get("small"):
        sm = result["small"]
        lines += ["", f"## Generate-then-encode (max_docs={sm['max_docs']}, STS-B "
                  f"{sm['max_docs']} pairs)", "",
                  "| model | suite mean |", "|---|---|"]
        for m, v in sm["models"].items():
            lines.append(f"| {m} | {v['mean']:.3f} |")
    lines += ["", f"Reproduce: `{result['command']}`"]
    return "\n".join(lines) + "\n"


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:.0f}%"


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    models = result["models"]
    names = list(models)
    tasks = list(next(iter(models.values()))["scores"])
    types = sorted({t for m in names for t in models[m]["by_type"]})
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(16, 5), gridspec_kw={"width_ratios": [3, 1.3]})
    w = 0.8 / len(names)
    for i, m in enumerate(names):
        vals = [models[m]["scores"].get(t, {}).get("score") or 0.0 for t in tasks]
        ax1.bar(np.arange(len(tasks)) + i * w, vals, w, label=m)
        tv = [models[m]["by_type"].get(t, 0.0) for t in types] + [models[m]["mean"]]
        ax2.bar(np.arange(len(types) + 1) + i * w, tv, w, label=m)
    ax1.set_xticks(np.arange(len(tasks)) + 0.4 - w / 2)
    ax1.set_xticklabels([t.replace("Offline", "") for t in tasks], rotation=35, ha="right", fontsize=8)
    ax1.set_ylabel("main score")
    ax1.set_title("per task")
    ax2.set_xticks(np.arange(len(types) + 1) + 0.4 - w / 2)
    ax2.set_xticklabels(types + ["suite mean"], rotation=35, ha="right", fontsize=8)
    ax2.set_title("per task type")
    fig.suptitle("Offline suite: LLM2Vec-Gen student (SmolLM2-135M) vs baselines")
    # one legend under both panels: inside a panel it covers the bars
    fig.legend(*ax1.get_legend_handles_labels(), loc="lower center", ncol=len(names), fontsize=8)
    fig.tight_layout(rect=(0, 0.07, 1, 1))
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _rel(path: str) -> str:
    full = Path(path).resolve()
    return str(full.relative_to(ROOT)) if full.is_relative_to(ROOT) else str(path)


def model_specs(args) -> dict[str, tuple[str, str]]:
    """{label: (spec, config)}: the --add models, else the student and --models baselines."""
    if not args.add:
        return {"student": (args.student, args.config),
                **{m: (m, args.config) for m in args.models.split(",") if m}}
    specs = {}
    for item in args.add:
        label, sep, rest = item.partition("=")
        if not sep or not rest:
            raise SystemExit(f"--add {item!r}: use LABEL=SPEC or LABEL=SPEC@CONFIG.")
        spec, _, config = rest.partition("@")
        specs[label] = (spec, config or args.config)
    return specs


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default=str(ROOT / "configs" / "laptop.yaml"))
    p.add_argument("--student", default="l2vg-smollm2-135m-laptop",
                   help="trained encoder folder or packaged encoder name")
    p.add_argument("--models", default="mean-pool,last-token,teacher",
                   help="baselines at full size (comma-separated)")
    p.add_argument("--max-docs", type=int, default=500)
    p.add_argument("--gte-max-docs", type=int, default=100,
                   help="size for generate-then-encode (0 = skip it)")
    p.add_argument("--quick", action="store_true", help="max_docs 60, STS-B 200 pairs, no g-t-e")
    p.add_argument("--add", action="append", default=[], metavar="LABEL=SPEC[@CONFIG]",
                   help="evaluate only these models (each under its own config); repeatable")
    p.add_argument("--keep", action="store_true",
                   help="keep the models already in the results file (same suite and sizes)")
    p.add_argument("--work", default=str(ROOT / "outputs" / "quality"))
    p.add_argument("--out", default=str(ROOT / "bench" / "results" / "quality"))
    p.add_argument("overrides", nargs="*", help="config overrides (e.g. cluster.num_cpus=2)")
    args = p.parse_args()

    from l2vg_ray.config import load_config
    from l2vg_ray.eval.suites import suite_task_names
    from l2vg_ray.ray_utils import init_ray

    max_docs, sts_docs, gte_docs = args.max_docs, STS_PAIRS, args.gte_max_docs
    if args.quick:
        max_docs, sts_docs, gte_docs = 60, 200, 0
    cfg = load_config(args.config, ["eval.suite=offline", *args.overrides])
    names = suite_task_names(cfg)
    init_ray(cfg.cluster, log_to_driver=False)
    work = Path(args.work)
    t_start = time.perf_counter()

    specs = model_specs(args)
    out = Path(args.out)
    previous = json.loads(out.with_suffix(".json").read_text()) if args.keep else {}
    if previous and (previous["max_docs"], previous["sts_pairs"]) != (max_docs, sts_docs):
        raise SystemExit(f"--keep: {out}.json was measured at max_docs={previous['max_docs']}, "
                         f"sts_pairs={previous['sts_pairs']}; rerun without --keep or use those.")
    models: dict[str, dict] = dict(previous.get("models", {}))
    for label, (spec, config) in specs.items():
        print(f"evaluating {label} ({spec}, {config})", flush=True)
        scores = score_suite(config, spec, names, max_docs, work, args.overrides,
                             sts_docs=sts_docs)
        models[label] = {"spec": spec, "config": _rel(config), "scores": scores,
                         "mean": suite_mean(scores), "by_type": type_means(scores)}
    order = ["student", "teacher", "student-unsup", "teacher-unsup", "mean-pool", "last-token"]
    models = {k: models[k] for k in sorted(models, key=lambda k: (k not in order, order.index(k)
                                                                   if k in order else 0, k))}
    result = {
        "benchmark": "offline suite quality: students vs baselines",
        "config": _rel(args.config),
        "max_docs": max_docs, "sts_pairs": sts_docs,
        "models": models,
    }
    if {"student", "mean-pool", "teacher"} <= set(models):
        result["targets"] = targets(models)
    if {"student-unsup", "teacher-unsup"} <= set(models):
        result["paper_targets"] = paper_targets(models)
    if gte_docs:
        small = {}
        for label, spec in (("student", args.student), ("mean-pool", "mean-pool"),
                            ("teacher", "teacher"), ("generate-then-encode", "generate-then-encode")):
            print(f"evaluating {label} at max_docs={gte_docs}", flush=True)
            sc = evaluate(args.config, spec, names, gte_docs, work, args.overrides)
            small[label] = {"mean": suite_mean(sc), "by_type": type_means(sc),
                            "scores": {n: sc[n]["score"] for n in names}}
        result["small"] = {"max_docs": gte_docs, "models": small}
    command = "python bench/quality.py " + " ".join(sys.argv[1:])
    result["commands"] = [*previous.get("commands", [previous["command"]] if "command" in previous
                                       else []), command] if args.keep else [command]
    result["command"] = command
    result["wall_s"] = round(time.perf_counter() - t_start, 1)
    result["host"] = {"cpus": os.cpu_count(), "load_avg_1m": os.getloadavg()[0],
                      "python": platform.python_version()}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    if "targets" in result:
        out.with_suffix(".md").write_text(markdown(result))
        plot(result, out.with_suffix(".png"))
        print(markdown(result))
    print(f"wrote {out.with_suffix('.json')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
