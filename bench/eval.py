"""Benchmark: the offline suite (the teacher, or --model), sequential vs Ray fan-out vs warm embedding cache.

    python bench/eval.py [--quick] [--config configs/quickstart.yaml] [--workers 2]

1. sequential: one process, ``mteb.evaluate`` over all tasks in turn, no embedding cache,
   torch using every core of the machine (the plain way to run mteb);
2. fan-out (cold): ``run_eval`` with ``--workers`` Ray tasks at a time (1 CPU each) and an empty
   embedding cache (worker start-up and encoder loading included);
3. fan-out (warm): the same again (``eval.overwrite=true``), every embedding from the cache;
   model loads counted in both (the rows' ``model_loads``: one per worker process is the target);
4. encoder actors (``--encoders`` actors hold the model, each task scores on
   ``--scoring-cpus`` CPUs and sends its cache misses to them), cold cache then warm: the loads are
   the actors' (``encoder_actor_loads``), and mteb's scoring overlaps with encoding;
5. one large retrieval task (``OfflineSQuADRetrieval`` at ``--shard-docs`` documents), cold cache:
   1 worker vs ``--workers`` workers with its corpus sharded over them (``eval.shard_min_docs``).
Ratios are measured side by side in this one run and written to bench/results/eval.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

from _common import ROOT


def sequential(cfg, names: list[str], data_dir: str) -> tuple[float, dict[str, float]]:
    import mteb
    import torch

    from l2vg_ray.eval.adapter import InstructionSet, MTEBEncoder
    from l2vg_ray.eval.suites import build_task
    from l2vg_ray.loading import load_encoder

    torch.set_num_threads(os.cpu_count() or 1)
    t0 = time.perf_counter()
    # The same encoder, instructions and input length as run_eval's tasks, so scores compare.
    spec = str(cfg.eval.model)
    model = MTEBEncoder(load_encoder(spec, cfg, max_length=cfg.eval.max_length),
                        instructions=InstructionSet.named(str(cfg.eval.instructions)),
                        batch_size=int(cfg.eval.batch_size), spec=spec)
    tasks = [build_task(n, data_dir=data_dir, max_docs=int(cfg.eval.max_docs), seed=int(cfg.eval.seed))
             for n in names]
    result = mteb.evaluate(model, tasks, cache=None, show_progress_bar=False, co2_tracker=False,
                           encode_kwargs={"batch_size": int(cfg.eval.batch_size)})
    scores = {r.task_name: float(r.get_score()) for r in result.task_results}
    return time.perf_counter() - t0, scores


def _timed_run(cfg) -> tuple[float, dict, list[dict]]:
    """``run_eval(cfg)``: its seconds, its result and its rows (read at once: a later run into
    the same output_dir rewrites them)."""
    from l2vg_ray.eval.runner import run_eval

    t0 = time.perf_counter()
    run = run_eval(cfg)
    seconds = time.perf_counter() - t0
    return seconds, run, json.loads(Path(run["files"]["json"]).read_text())["results"]


def _model_loads(rows: list[dict]) -> int:
    """Models the tasks of one run loaded (the rows' ``model_loads``)."""
    return sum(int(r.get("model_loads") or 0) for r in rows)


def large_task(cfg, args, work: Path) -> dict:
    """One big retrieval task, cold cache each time: 1 worker, then sharded over --workers."""
    from omegaconf import OmegaConf

    out: dict = {"task": "OfflineSQuADRetrieval", "max_docs": args.shard_docs}
    for label, workers, min_docs in (("one_worker", 1, 0), ("sharded", args.workers, 1)):
        c = OmegaConf.merge(cfg, OmegaConf.from_dotlist([
            "eval.suite=list", "eval.tasks=[OfflineSQuADRetrieval]", f"eval.max_docs={args.shard_docs}",
            f"eval.max_concurrency={workers}", f"eval.shards={workers}", f"eval.shard_min_docs={min_docs}",
            f"eval.output_dir={work / ('large-' + label)}", f"eval.cache_dir={work / ('large-cache-' + label)}",
        ]))
        seconds, _, (row,) = _timed_run(c)
        out[label] = {"seconds": round(seconds, 2), "score": row["main_score"],
                      "n_encoded_by_task": row["n_encoded"], "corpus_shards": row.get("corpus_shards")}
        print(f"large task, {label}: {out[label]}")
    out["speedup_sharded_vs_one_worker"] = round(out["one_worker"]["seconds"] / out["sharded"]["seconds"], 2)
    out["scores_equal"] = out["one_worker"]["score"] == out["sharded"]["score"]
    return out


def encoder_actors(cfg, args, work: Path) -> dict:
    """The suite with ``--encoders`` encoder actors and light scoring tasks: cold, then warm."""
    from omegaconf import OmegaConf

    c = OmegaConf.merge(cfg, OmegaConf.from_dotlist([
        f"eval.encoders={args.encoders}", f"eval.scoring_cpus={args.scoring_cpus}",
        f"eval.cache_dir={work / 'embeddings-actors'}", f"eval.output_dir={work / 'actors'}",
    ]))
    out: dict = {"encoders": args.encoders, "scoring_cpus": args.scoring_cpus}
    for label in ("cold", "warm"):
        seconds, run, rows = _timed_run(c)
        out[label] = {"seconds": round(seconds, 2), "n_failed": run["n_failed"],
                      "task_model_loads": _model_loads(rows),
                      "encoder_actor_loads": run.get("encoder_actor_loads"), "scores": run["scores"]}
        print(f"encoder actors, {label}: {out[label]['seconds']}s, actor loads "
              f"{out[label]['encoder_actor_loads']}, task loads {out[label]['task_model_loads']}")
    out["speedup_warm_vs_cold"] = round(out["cold"]["seconds"] / out["warm"]["seconds"], 2)
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default=str(ROOT / "configs" / "quickstart.yaml"))
    p.add_argument("--quick", action="store_true", help="small sizes (eval.max_docs=60)")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--model", default="teacher",
                   help="encoder to evaluate: a baseline or a trained / packaged encoder "
                        "(e.g. l2vg-smollm2-135m-laptop)")
    p.add_argument("--max-docs", type=int, default=None)
    p.add_argument("--shard-docs", type=int, default=2000,
                   help="documents of the large retrieval task (0 = skip part 5)")
    p.add_argument("--encoders", type=int, default=1,
                   help="encoder actors of part 4 (0 = skip part 4)")
    p.add_argument("--scoring-cpus", type=float, default=0.5,
                   help="CPUs per scoring task in part 4")
    p.add_argument("--out", default=str(ROOT / "bench" / "results" / "eval.json"))
    args = p.parse_args()

    from l2vg_ray.config import load_config
    from l2vg_ray.eval.suites import suite_task_names
    from l2vg_ray.eval.tasks.data import prepare_offline_data
    from l2vg_ray.eval.tasks.offline import OFFLINE_TASKS
    from l2vg_ray.ray_utils import init_ray

    max_docs = args.max_docs or (60 if args.quick else None)
    work = Path(tempfile.mkdtemp(prefix="l2vg-bench-eval-"))
    overrides = [
        f"eval.model={args.model}", "eval.suite=offline", f"output_dir={work}",
        f"eval.cache_dir={work / 'embeddings'}", "eval.overwrite=true",
        f"eval.max_concurrency={args.workers}", "eval.num_cpus_per_task=1",
        f"cluster.num_cpus={max(args.workers, 1)}",
    ] + ([f"eval.max_docs={max_docs}"] if max_docs else [])
    cfg = load_config(args.config, overrides)
    names = suite_task_names(cfg)
    prepared = prepare_offline_data(cfg.cache_dir, sorted({OFFLINE_TASKS.get(t).data_file for t in names}))
    if prepared.missing:
        raise SystemExit(f"offline data missing, cannot benchmark: {prepared.missing}")
    data_dir = str(prepared.folder)
    print(f"offline suite: {len(names)} tasks, max_docs={cfg.eval.max_docs}, model={cfg.eval.model}")

    seq_s, seq_scores = sequential(cfg, names, data_dir)
    print(f"sequential mteb.evaluate: {seq_s:.1f}s")

    init_ray(cfg.cluster, log_to_driver=False)
    cold_s, cold, cold_rows = _timed_run(cfg)
    warm_s, warm, warm_rows = _timed_run(cfg)

    # What a warm run cannot skip: mteb's scoring (classifier fits, k-means), per task.
    warm_task_s = {r["task"]: r["seconds"] for r in warm_rows if r["status"] == "ok"}
    loads = {"cold": _model_loads(cold_rows), "warm": _model_loads(warm_rows)}
    actors = encoder_actors(cfg, args, work) if args.encoders else None
    large = large_task(cfg, args, work) if args.shard_docs else None

    diffs = {n: abs(cold["scores"][n] - seq_scores[n]) for n in seq_scores if cold["scores"].get(n) is not None}
    agree = bool(diffs) and max(diffs.values()) < 1e-3
    result = {
        "benchmark": f"eval offline suite, {args.model}",
        "model": args.model,
        "quick": bool(args.quick),
        "max_docs": int(cfg.eval.max_docs),
        "n_tasks": len(names),
        "workers": args.workers,
        "sequential_s": round(seq_s, 2),
        "fanout_cold_s": round(cold_s, 2),
        "fanout_warm_cache_s": round(warm_s, 2),
        "speedup_fanout_vs_sequential": round(seq_s / cold_s, 2),
        "speedup_warm_vs_cold": round(cold_s / warm_s, 2),
        "warm_seconds_per_task": warm_task_s,
        "model_loads": loads,
        "model_loads_per_worker": round(loads["cold"] / max(args.workers, 1), 2),
        "encoder_actors": actors,
        "large_task": large,
        "targets": {"fanout_vs_sequential": 1.8, "warm_vs_cold": 10.0, "model_loads_per_worker": 1.0,
                    "encoder_actor_loads_per_actor": 1.0,
                    "large_task_sharded_vs_one_worker": 0.9 * args.workers},
        "scores_match_sequential": agree,
        "max_abs_diff_vs_sequential": round(max(diffs.values()), 6) if diffs else None,
        "encoder_actor_scores_equal_fanout": (actors["cold"]["scores"] == cold["scores"]) if actors else None,
        "n_failed": cold["n_failed"] + warm["n_failed"]
                    + (actors["cold"]["n_failed"] + actors["warm"]["n_failed"] if actors else 0),
        "scores": cold["scores"],
        "host": {"cpus": os.cpu_count(), "load_avg_1m": os.getloadavg()[0], "python": platform.python_version()},
    }
    print(json.dumps({k: v for k, v in result.items() if k != "scores"}, indent=2))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")
    shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
