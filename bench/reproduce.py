"""Reproduce a packaged student from its recipe: same config, shipped responses, same seed.

    python bench/reproduce.py l2vg-smollm2-135m-laptop-unsup --steps 200   # the first 200 steps
    python bench/reproduce.py l2vg-smollm2-135m-laptop-unsup               # the whole recipe
    nohup python bench/reproduce.py l2vg-smollm2-135m-laptop > logs/reproduce.log 2>&1 &

What it checks, in order:

1. The recipe's config file still gives the stage config hashes recorded in ``recipe.json``
   (otherwise the recipe changed after it shipped; the differing stages are named and nothing
   runs unless ``--allow-drift``).
2. It runs the recipe's one command, ``l2vg run --config <recipe config>``, in its own folder
   (``outputs/reproduce-<name>``, a subprocess with its log beside it): teacher embeddings of the
   packaged responses, then training. Like any run it resumes when started again.
   - ``--steps N`` stops the run once its checkpoint at step N (a multiple of
     ``train.checkpoint_every``) is written, and compares the losses of steps 1..N and the
     held-out MSE at every validated step <= N with the recipe's (``first_losses``,
     ``validation``). The stopped run stays resumable: the same command continues it.
   - Without ``--steps`` the run trains to the end (and is stopped there: its own eval stage
     scores with the config's settings, not the recipe's; ``--run-eval`` lets it finish); then
     the trained tensors are compared with the packaged ones and the student is scored as
     ``bench/quality.py`` scores it (all 1379 STS-B pairs, ``--max-docs`` elsewhere, the
     overrides below), against the recipe's scores.

Writes ``bench/results/reproduce_<name>.json``: the hash check, each stage's wall time, the
largest loss / held-out MSE / score differences and a verdict against ``--rtol`` (losses, MSE)
and ``--score-atol`` (scores).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from _common import RESULTS, ROOT

QUALITY_OVERRIDES = ["eval.max_length=256", "eval.strict_data=true"]  # as README's quality runs


def hash_check(recipe: dict, config: str) -> dict:
    from l2vg_ray.pipeline import config_file_hashes

    now = config_file_hashes(config)
    shipped = recipe.get("config_hashes") or {}
    return {s: {"recipe": shipped.get(s), "now": now[s], "same": shipped.get(s) == now[s]}
            for s in ("generate", "train")}


def checkpoints(out: Path) -> list[tuple[int, Path]]:
    """(step, folder) of every complete checkpoint of the run under ``out``, by step."""
    found = []
    for d in (out / "train" / "ray_results").glob("*/checkpoint_*"):
        if (d / "train_state.pt").is_file() and d.name.rsplit("_", 1)[-1].isdigit():
            found.append((int(d.name.rsplit("_", 1)[-1]), d))
    return sorted(found)


def stop(proc: subprocess.Popen) -> None:
    """Interrupt the run (Ctrl-C: Ray shuts down), then end its whole process group."""
    if proc.poll() is not None:
        return
    os.killpg(proc.pid, signal.SIGINT)
    try:
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def run_recipe(config: str, out: Path, steps: int, *, run_eval: bool = False) -> dict:
    """``l2vg run`` in a subprocess; with ``steps``, stopped once checkpoint ``steps`` exists;
    otherwise stopped once training has finished, unless ``run_eval``."""
    trained = out / "train" / "_SUCCESS.json"
    out.mkdir(parents=True, exist_ok=True)
    log = out / "reproduce.log"
    cmd = [sys.executable, "-m", "l2vg_ray.cli", "run", "--config", config, f"output_dir={out}"]
    print(f"running {' '.join(cmd)} (log: {log})", flush=True)
    t0 = time.perf_counter()
    with log.open("a") as f:
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT,
                                start_new_session=True)
        try:
            while proc.poll() is None:
                time.sleep(10)
                if steps and any(s >= steps for s, _ in checkpoints(out)):
                    time.sleep(5)  # let the checkpoint's files settle
                    stop(proc)
                    break
                if not steps and not run_eval and trained.is_file():
                    stop(proc)  # the eval stage's scores are not the ones compared
                    break
        finally:
            stop(proc)
    if not steps and not trained.is_file():
        raise SystemExit(f"`{' '.join(cmd)}` exited with {proc.returncode}: see {log}")
    return {"command": " ".join(cmd[2:]), "wall_s": round(time.perf_counter() - t0, 1),
            "returncode": proc.returncode, "log": str(log)}


def rel_diff(a: float, b: float) -> float:
    return abs(a - b) / max(abs(b), 1e-12)


def val_diffs(validation: list[dict], recipe: dict, *, up_to: int | None = None) -> dict:
    """{step: now, recipe, rel_diff} of the held-out MSE at every step both runs validated."""
    now = {int(v["step"]): v["val_align_mse"] for v in validation}
    shipped = {int(v["step"]): v["val_align_mse"]
               for v in (recipe.get("train") or {}).get("validation") or []}
    return {s: {"now": now[s], "recipe": shipped[s], "rel_diff": rel_diff(now[s], shipped[s])}
            for s in sorted(now) if s in shipped and (up_to is None or s <= up_to)}


def loss_diffs(losses: dict[int, float], recipe: dict, *, up_to: int) -> list[float]:
    """Relative differences of the step losses 1..``up_to`` against the recipe's
    ``first_losses``, at the steps both runs logged."""
    shipped = (recipe.get("train") or {}).get("first_losses") or []
    return [rel_diff(losses[s], shipped[s - 1]) for s in range(1, min(up_to, len(shipped)) + 1)
            if s in losses]


def compare_prefix(recipe: dict, out: Path, steps: int, rtol: float) -> dict:
    from l2vg_ray.train.state import read_train_state

    step, ckpt = next((s, d) for s, d in checkpoints(out) if s >= steps)
    history = read_train_state(ckpt)["state"].history
    losses = {int(r["step"]): r["loss"] for r in history if r.get("loss") is not None}
    diffs = loss_diffs(losses, recipe, up_to=steps)
    vals = val_diffs([r for r in history if "val_align_mse" in r], recipe, up_to=step)
    worst = max([*diffs, *(v["rel_diff"] for v in vals.values())], default=None)
    return {
        "checkpoint_step": step,
        "losses_compared": len(diffs),
        "loss_max_rel_diff": max(diffs, default=None),
        "loss_rel_diff_at": {s: diffs[s - 1] for s in (1, 10, 50, 100, 200) if s <= len(diffs)},
        "val_align_mse": vals,
        "reproduced": bool(diffs) and worst is not None and worst <= rtol,
        "rtol": rtol,
    }


def compare_full(name: str, recipe: dict, config: str, out: Path, args) -> dict:
    import quality
    import torch
    from safetensors.torch import load_file
    from ship_encoder import FIRST_STEPS, step_losses

    from l2vg_ray.config import load_config
    from l2vg_ray.eval.suites import suite_task_names
    from l2vg_ray.models.resolver import packaged_encoder_dir
    from l2vg_ray.ray_utils import init_ray

    final = out / "train" / "final" / "trainable.safetensors"
    mine, shipped = load_file(final), load_file(packaged_encoder_dir(name) / "trainable.safetensors")
    tensors = {k: float((mine[k].float() - shipped[k].float()).abs().max()
                        / shipped[k].float().abs().max().clamp_min(1e-12)) for k in shipped}
    summary = json.loads((out / "train" / "_SUCCESS.json").read_text())["summary"]
    vals = val_diffs(summary.get("validation") or [], recipe)
    losses = loss_diffs(step_losses(out / "train" / "metrics.csv"), recipe, up_to=FIRST_STEPS)
    cfg = load_config(config, ["eval.suite=offline"])
    names = suite_task_names(cfg)
    init_ray(cfg.cluster, log_to_driver=False)  # the run's own Ray stopped with it
    scores = quality.score_suite(config, str(out / "train" / "final"), names, args.max_docs,
                                 out / "quality", QUALITY_OVERRIDES)
    bench = next(iter((recipe.get("quality_benchmark") or {}).values()), None) or {}
    recipe_scores = {t: r["score"] for t, r in (bench.get("scores") or {}).items()}
    diffs = {t: scores[t]["score"] - recipe_scores[t] for t in names
             if t in recipe_scores and scores[t]["score"] is not None}
    mean_now = quality.suite_mean(scores)
    worst_val = max((v["rel_diff"] for v in vals.values()), default=None)
    return {
        "trainable_max_rel_diff": tensors,
        "trainable_identical": all(torch.equal(mine[k], shipped[k]) for k in shipped),
        "losses_compared": len(losses),
        "loss_max_rel_diff": max(losses, default=None),
        "val_align_mse": vals,
        "suite_mean": {"now": mean_now, "recipe": bench.get("mean")},
        "score_diffs": diffs,
        "score_max_abs_diff": max((abs(d) for d in diffs.values()), default=None),
        "reproduced": (worst_val is not None and worst_val <= args.rtol and bool(diffs)
                       and max(abs(d) for d in diffs.values()) <= args.score_atol),
        "rtol": args.rtol, "score_atol": args.score_atol,
    }


def stage_seconds(out: Path) -> dict:
    """Each finished stage's wall time from its success marker."""
    seconds = {}
    for stage, folder in (("generate", "data"), ("train", "train"), ("eval", "eval")):
        marker = out / folder / "_SUCCESS.json"
        if marker.is_file():
            seconds[stage] = json.loads(marker.read_text()).get("seconds")
    return seconds


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("name", help="a packaged encoder with a recipe.json (l2vg-smollm2-135m-laptop)")
    p.add_argument("--steps", type=int, default=0,
                   help="stop at this checkpoint step and compare the curve so far (0 = the whole run)")
    p.add_argument("--out-dir", default=None, help="default: outputs/reproduce-<name>")
    p.add_argument("--max-docs", type=int, default=300, help="documents per task (not STS-B)")
    p.add_argument("--rtol", type=float, default=1e-2,
                   help="largest relative loss / held-out MSE difference called reproduced")
    p.add_argument("--score-atol", type=float, default=0.01,
                   help="largest per-task score difference called reproduced (full runs)")
    p.add_argument("--allow-drift", action="store_true",
                   help="run even when the config no longer gives the recipe's stage hashes")
    p.add_argument("--run-eval", action="store_true",
                   help="whole runs: let the run's own eval stage finish too (its settings are the "
                        "config's, not the recipe scores'; ~11 min here)")
    p.add_argument("--out", default=None, help="default: bench/results/reproduce_<name>.json")
    args = p.parse_args()

    from l2vg_ray.models.resolver import packaged_encoder_dir

    recipe_path = packaged_encoder_dir(args.name) / "recipe.json"
    if not recipe_path.is_file():
        p.error(f"{args.name!r} has no {recipe_path}: pass a packaged encoder that ships a recipe "
                "(l2vg-smollm2-135m-laptop, l2vg-smollm2-135m-laptop-unsup).")
    recipe = json.loads(recipe_path.read_text())
    config = str(ROOT / recipe["config"])
    out = Path(args.out_dir) if args.out_dir else ROOT / "outputs" / f"reproduce-{args.name}"
    hashes = hash_check(recipe, config)
    drift = [s for s, h in hashes.items() if not h["same"]]
    print(f"config hashes of {config}: " + ", ".join(
        f"{s} {'same' if h['same'] else 'CHANGED'} ({h['now']})" for s, h in hashes.items()))
    if drift and not args.allow_drift:
        raise SystemExit(f"{config} no longer gives the recipe's {', '.join(drift)} config hash: "
                         "the recipe changed after it shipped. Reproduce from the commit that "
                         "shipped it, or pass --allow-drift to run the current config anyway.")
    run = run_recipe(config, out, args.steps, run_eval=args.run_eval)
    check = (compare_prefix(recipe, out, args.steps, args.rtol) if args.steps
             else compare_full(args.name, recipe, config, out, args))
    seconds = stage_seconds(out)
    result = {
        "benchmark": "reproduce a packaged student from its recipe",
        "name": args.name, "config": recipe["config"], "mode": f"first {args.steps} steps" if args.steps
        else "whole recipe",
        "config_hashes": hashes, "run": run, "stage_seconds": seconds,
        # a stopped run has no train marker: its training time is the run's wall time less the
        # stages before it
        **({"train_s_to_checkpoint": round(run["wall_s"] - (seconds.get("generate") or 0), 1)}
           if args.steps else {}),
        "recipe_stage_seconds": recipe.get("stage_seconds"), **check,
        "command": "python bench/reproduce.py " + " ".join(sys.argv[1:]),
        "host": {"cpus": os.cpu_count(), "load_avg_1m": os.getloadavg()[0]},
    }
    path = Path(args.out) if args.out else RESULTS / f"reproduce_{args.name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2, default=str) + "\n")
    print(json.dumps({k: result[k] for k in ("mode", "stage_seconds", "reproduced")}, indent=2))
    print(f"wrote {path}")
    return 0 if result["reproduced"] else 1


if __name__ == "__main__":
    sys.exit(main())
