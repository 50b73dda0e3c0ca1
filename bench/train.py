"""Training throughput: the Ray Train loop vs a plain single-process PyTorch loop, 1 vs 2 workers.

Same model, same data (synthetic rows with realistic lengths, ``schema.dataset_schema``), same
global batch, same optimiser/schedule/clipping. Measured side by side in one run:

- ``plain``: one process, ``torch.set_num_threads(T)``, micro-batches in file order;
- ``ray-1``: ``run_train`` with 1 worker x T CPUs (the whole Ray Train path: Ray Data shard,
  per-step ``ray.train.report``, checkpoints, DDP skipped at world size 1);
- ``ray-2``: ``run_train`` with 2 workers x T/2 CPUs, same global batch (DDP over the trainable
  tensors, gloo all-reduce). On a 2-core machine this cannot be faster than 1 worker x 2 threads:
  it measures the overhead of data parallelism, not a speed-up.

Steady-state steps/s skip the first ``--warmup`` steps (model load, first-batch allocation); Ray
steps are timed from the wall-clock stamp each step records, so blocking reports and checkpoints count.
The peak memory of a training step vs a two-LLM-copy design is ``bench/model_memory.py``'s job.

    python bench/train.py --quick      # tiny random model (seconds)
    python bench/train.py              # SmolLM2-135M-Instruct, quickstart lengths (minutes)

Writes ``bench/results/train.json`` (``train_quick.json`` with ``--quick``).

    python bench/train.py --frozen-prefix [--quick]

The frozen-prefix arm: one training step (forward, backward, AdamW) of the encoder with the query
prefix run once without gradient (``model.frozen_prefix=true``, after) against the one-pass
reference (before), same seeded init and batches, each in a fresh process so that its peak RSS
is its own (the peak is reset after the model loads: /proc/self/clear_refs). Shapes: the laptop
step (SmolLM2-135M, batch 8, 64-token queries of which 20 special tokens, 32-token responses),
the same alignment-only, and 512-token queries (batch 2), with and without the decoder pass.
Writes ``bench/results/train_frozen_prefix.json`` (``..._quick.json``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import tempfile
import time
from pathlib import Path

import _common  # noqa: F401  (environment and sys.path)

RESULTS = Path(__file__).resolve().parent / "results"
WORDS = (
    "the a of to and in is it that for on with as was by at be this from or an are not have "
    "which one you had but were all when there can we what their more if will about so time "
    "model data train query answer light water river city energy network language method "
    "result value system people history science music market health policy theory"
).split()


def make_data(out_dir: Path, *, rows: int, teacher_dim: int, query_words: int, response_words: int,
              seed: int = 0) -> Path:
    """Synthetic generated-dataset rows: fixed lengths so every batch costs the same."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    from l2vg_ray import schema

    rng = np.random.default_rng(seed)
    words = np.array(WORDS)
    queries = [" ".join(rng.choice(words, query_words)) + "?" for _ in range(rows)]
    responses = [" ".join(rng.choice(words, response_words)) + "." for _ in range(rows)]
    teacher = rng.standard_normal((rows, teacher_dim)).astype(np.float32)
    teacher /= np.linalg.norm(teacher, axis=1, keepdims=True)
    table = pa.table(
        {
            schema.ID: [schema.query_id(f"{i}:{q}") for i, q in enumerate(queries)],
            schema.QUERY: queries,
            schema.RESPONSE: responses,
            schema.TEACHER_EMBEDDING: list(teacher),
            schema.GENERATOR_MODEL: ["synthetic"] * rows,
            schema.TEACHER_MODEL: ["random"] * rows,
            schema.SAMPLING_PARAMS: ["{}"] * rows,
            schema.RESPONSE_TOKENS: [response_words] * rows,
        },
        schema=schema.dataset_schema(teacher_dim),
    )
    out_dir.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, out_dir / "part-00000-00000000.parquet")
    return out_dir


def steady_steps_per_s(stamps: list[float], warmup: int) -> float:
    """Steps per second between the end of step ``warmup`` and the end of the last step."""
    stamps = stamps[warmup - 1 :] if warmup > 0 else stamps
    if len(stamps) < 2:
        raise ValueError("Need at least 2 timed steps after warmup; raise --steps.")
    return (len(stamps) - 1) / (stamps[-1] - stamps[0])


def plain_loop(cfg, *, threads: int, steps: int) -> dict:
    """The reference: the same step as the Ray loop, in this process, no Ray anywhere."""
    import pyarrow.parquet as pq
    import torch

    from l2vg_ray.method import L2VGEncoder
    from l2vg_ray.train.data import TRAIN_COLUMNS, batch_lists
    from l2vg_ray.train.schedule import build_optimizer, build_scheduler
    from l2vg_ray.train.state import seed_everything

    t = cfg.train
    torch.set_num_threads(threads)
    seed_everything(t.seed)
    table = pq.read_table(str(t.data_dir), columns=list(TRAIN_COLUMNS))
    encoder = L2VGEncoder.from_config(cfg.model, cache_dir=cfg.cache_dir, device="cpu")
    params = encoder.trainable_parameters()
    opt = build_optimizer(params, lr=t.lr, weight_decay=t.weight_decay)
    sched = build_scheduler(opt, kind=t.scheduler, warmup_steps=t.warmup_steps, total_steps=steps)
    encoder.train()
    stamps, losses = [], []
    b = t.batch_size
    for step in range(steps):
        start = (step * b) % (table.num_rows - b + 1)
        chunk = table.slice(start, b)
        rows = {k: chunk.column(k).to_numpy(zero_copy_only=False) for k in chunk.column_names}
        queries, responses, teacher = batch_lists(rows)
        opt.zero_grad(set_to_none=True)
        out = encoder(encoder.prepare_batch(queries, responses, torch.from_numpy(teacher)),
                      recon_weight=t.recon_weight, align_weight=t.align_weight)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(params, t.max_grad_norm)
        opt.step()
        sched.step()
        losses.append(float(out.loss.detach()))
        stamps.append(time.time())
    return {"stamps": stamps, "losses": losses}


def ray_loop(cfg, *, workers: int, cpus_per_worker: float, steps: int) -> dict:
    from l2vg_ray.train.state import read_train_state
    from l2vg_ray.train.trainer import run_train

    cfg = cfg.copy()
    cfg.train.num_workers = workers
    cfg.train.cpus_per_worker = float(cpus_per_worker)
    cfg.train.max_steps = steps
    cfg.train.checkpoint_every = steps  # one checkpoint (the final one), as in a real run's tail
    cfg.train.output_dir = f"{cfg.train.output_dir}-w{workers}"
    start = time.perf_counter()
    summary = run_train(cfg)
    # Training steps only: the history also holds the step-0 validation row (no step time).
    history = [h for h in read_train_state(summary["checkpoint"])["state"].history if "time" in h]
    return {
        "stamps": [h["time"] for h in history],
        "losses": [h["loss"] for h in history],
        "fit_time_s": summary["fit_time_s"],
        "run_train_s": time.perf_counter() - start,
    }


# --- the frozen-prefix arm -------------------------------------------------------------------

PREFIX_SHAPES = {  # name: (batch, max_length incl. 20 special tokens, max_response_length, recon)
    "laptop_step": (8, 64, 32, True),
    "align_only": (8, 64, 32, False),
    "long_query": (2, 512, 32, True),
    "long_query_align_only": (2, 512, 32, False),
}


def _rss_mb(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


def prefix_arm(spec: dict) -> dict:
    """One configuration in this (fresh) process: step times, losses, peak RSS of the steps."""
    import numpy as np
    import torch

    from l2vg_ray.config import ModelConfig
    from l2vg_ray.method import L2VGEncoder

    torch.set_num_threads(spec["threads"])
    batch_size, max_length, max_response, recon = spec["shape"]
    enc = L2VGEncoder.from_config(ModelConfig(
        llm=spec["llm"], teacher="unused", n_thought=10, n_compression=10, max_length=max_length,
        max_response_length=max_response, device="cpu", frozen_prefix=spec["frozen_prefix"],
    ), teacher_dim=spec["teacher_dim"])
    rng = np.random.default_rng(0)
    words = np.array(WORDS)
    # Texts longer than the limits, so every row is cut to the same length: equal steps.
    queries = [" ".join(rng.choice(words, max_length * 2)) for _ in range(batch_size)]
    responses = [" ".join(rng.choice(words, max_response * 2)) for _ in range(batch_size)]
    teacher = rng.standard_normal((batch_size, spec["teacher_dim"])).astype(np.float32)
    batch = enc.prepare_batch(queries, responses, teacher)
    opt = torch.optim.AdamW(enc.trainable_parameters(), lr=1e-4)
    enc.train()
    times, losses = [], []
    grads0 = None
    for step in range(spec["warmup"] + spec["steps"]):
        if step == spec["warmup"]:
            Path("/proc/self/clear_refs").write_text("5")  # peak RSS from here on: the steps'
            rss_before = _rss_mb("VmRSS")
        t0 = time.perf_counter()
        out = enc(batch, recon_weight=1.0 if recon else 0.0)
        out.loss.backward()
        if step == 0:  # the same parameters in both arms: their gradients must agree
            grads0 = [p.grad.detach().clone().numpy() for p in enc.trainable_parameters()]
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t0)
        losses.append(float(out.loss.detach()))
    timed = times[spec["warmup"]:]
    return {"step_s_median": float(np.median(timed)), "step_s": timed, "losses": losses,
            "query_tokens": int(batch["query_input_ids"].shape[1]),
            "response_tokens": int(batch["response_input_ids"].shape[1]),
            "grads_step0": grads0,
            "rss_before_steps_mb": round(rss_before, 1),
            "peak_rss_steps_mb": round(_rss_mb("VmHWM"), 1)}


def prefix_fp64_check(spec: dict) -> dict:
    """Step-0 gradients of the laptop step with the LLM in float64 as the exact reference: how far
    each float32 arm is from it, and the two arms from each other in float64 (fresh process)."""
    import numpy as np
    import torch

    from l2vg_ray.config import ModelConfig
    from l2vg_ray.method import L2VGEncoder

    torch.set_num_threads(spec["threads"])
    batch_size, max_length, max_response, _ = PREFIX_SHAPES["laptop_step"]
    rng = np.random.default_rng(0)
    words = np.array(WORDS)
    queries = [" ".join(rng.choice(words, max_length * 2)) for _ in range(batch_size)]
    responses = [" ".join(rng.choice(words, max_response * 2)) for _ in range(batch_size)]
    teacher = rng.standard_normal((batch_size, spec["teacher_dim"])).astype(np.float32)

    def grads(frozen: bool, dtype: torch.dtype) -> list:
        enc = L2VGEncoder.from_config(ModelConfig(
            llm=spec["llm"], teacher="unused", n_thought=10, n_compression=10,
            max_length=max_length, max_response_length=max_response, device="cpu",
            frozen_prefix=frozen), teacher_dim=spec["teacher_dim"])
        enc.llm.to(dtype)  # the frozen LLM's arithmetic: where the summation order matters
        enc.train()
        enc(enc.prepare_batch(queries, responses, teacher)).loss.backward()
        return [p.grad.detach().double() for p in enc.trainable_parameters()]

    def worst(a: list, b: list) -> float:
        return max(float((x - y).norm() / y.norm().clamp(min=1e-300)) for x, y in zip(a, b, strict=True))

    exact = grads(False, torch.float64)
    return {"before_fp32_vs_fp64": worst(grads(False, torch.float32), exact),
            "after_fp32_vs_fp64": worst(grads(True, torch.float32), exact),
            "after_vs_before_both_fp64": worst(grads(True, torch.float64), exact)}


def frozen_prefix_bench(args) -> None:
    import multiprocessing as mp

    import torch

    steps = args.steps or (6 if args.quick else 12)
    if args.quick:
        from l2vg_ray.testing import build_tiny_llm

        llm = str(build_tiny_llm(Path(tempfile.mkdtemp(prefix="l2vg-bench-")) / "tiny-llm"))
    else:
        llm = "smollm2-135m-instruct"
        from l2vg_ray.models import resolve_model

        resolve_model(llm)  # materialised once, before the timed processes
    ctx = mp.get_context("spawn")
    runs: dict = {}
    for name, shape in PREFIX_SHAPES.items():
        for variant, frozen in (("before", False), ("after", True)):
            spec = {"llm": llm, "shape": shape, "frozen_prefix": frozen, "threads": args.threads,
                    "teacher_dim": 384, "steps": steps, "warmup": args.warmup}
            with ctx.Pool(1) as pool:
                runs.setdefault(name, {})[variant] = pool.apply(prefix_arm, (spec,))
            r = runs[name][variant]
            print(f"{name:22s} {variant:6s} {r['step_s_median']:7.3f} s/step  peak RSS "
                  f"{r['peak_rss_steps_mb']:7.0f} MB  (queries {r['query_tokens']} tokens)", flush=True)
    import numpy as np

    with ctx.Pool(1) as pool:
        fp64 = pool.apply(prefix_fp64_check, ({"llm": llm, "threads": args.threads,
                                               "teacher_dim": 384},))
    print(f"laptop step, step-0 gradients against float64: {fp64}", flush=True)
    ratios, rel_diff, drift, grad_diff = {}, {}, {}, {}
    for name, r in runs.items():
        ratios[name] = r["before"]["step_s_median"] / r["after"]["step_s_median"]
        a, b = r["after"]["losses"], r["before"]["losses"]
        rel_diff[name] = abs(a[0] - b[0]) / max(abs(b[0]), 1e-12)  # same parameters: step 0
        drift[name] = max(abs(x - y) / max(abs(y), 1e-12) for x, y in zip(a, b, strict=True))
        grad_diff[name] = max(float(np.linalg.norm(ga - gb) / max(np.linalg.norm(gb), 1e-30))
                              for ga, gb in zip(r["after"].pop("grads_step0"),
                                                r["before"].pop("grads_step0"), strict=True))
    out = {
        "benchmark": "train_frozen_prefix",
        "quick": args.quick,
        "settings": {"llm": "tiny-random-llama" if args.quick else llm, "threads": args.threads,
                     "steps": steps, "warmup_steps_excluded": args.warmup, "dtype": "float32",
                     "device": "cpu", "special_tokens": "10 + 10",
                     "shapes": {k: dict(zip(("batch", "max_length", "max_response_length",
                                             "reconstruction"), v, strict=True))
                                for k, v in PREFIX_SHAPES.items()}},
        "steps_per_s": {k: {v: 1.0 / r[v]["step_s_median"] for v in ("before", "after")}
                        for k, r in runs.items()},
        "peak_rss_steps_mb": {k: {v: r[v]["peak_rss_steps_mb"] for v in ("before", "after")}
                              for k, r in runs.items()},
        "ratio_laptop_step": ratios["laptop_step"],
        "ratio_align_only": ratios["align_only"],
        "ratio_long_query": ratios["long_query"],
        "ratio_long_query_align_only": ratios["long_query_align_only"],
        # at step 0, where both arms hold the same parameters (the equality the method needs)
        "max_rel_loss_diff": max(rel_diff.values()),
        "rel_loss_diff": rel_diff,
        # every trainable tensor's gradient at step 0: ||after - before|| / ||before||, the worst
        "max_rel_grad_diff": max(grad_diff.values()),
        "rel_grad_diff": grad_diff,
        # the float32 reference is itself this far from float64 arithmetic (laptop step): the
        # after/before difference above is the reference's own rounding, not the method's
        "grad_vs_float64_laptop_step": fp64,
        # the largest difference over all the steps: AdamW's per-coordinate normalisation turns
        # rounding-level gradient differences of near-zero coordinates into full-size updates,
        # so the two runs' parameters drift apart a little after the first step
        "rel_loss_drift_over_steps": drift,
        "runs": runs,
        "targets": {"ratio_align_only": 1.3, "ratio_laptop_step": 1.05, "ratio_long_query": 1.8,
                    "max_rel_loss_diff": 1e-4, "peak_rss": "lower at every shape"},
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                    "torch": torch.__version__, "loadavg_1m_at_end": os.getloadavg()[0]},
    }
    path = RESULTS / ("train_frozen_prefix_quick.json" if args.quick else "train_frozen_prefix.json")
    RESULTS.mkdir(exist_ok=True)
    path.write_text(json.dumps(out, indent=2))
    for k in PREFIX_SHAPES:
        b, a = out["peak_rss_steps_mb"][k]["before"], out["peak_rss_steps_mb"][k]["after"]
        print(f"{k:22s} after/before {ratios[k]:5.2f}x steps/s   peak RSS {b:6.0f} -> {a:6.0f} MB")
    print(f"max relative loss difference at equal parameters {out['max_rel_loss_diff']:.2e} "
          f"(target <= 1e-4), gradients {out['max_rel_grad_diff']:.2e}")
    print(f"wrote {path}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="tiny random model, few steps")
    p.add_argument("--steps", type=int, default=None, help="optimiser steps per configuration")
    p.add_argument("--warmup", type=int, default=2, help="steps left out of steps/s")
    p.add_argument("--batch", type=int, default=8, help="global batch")
    p.add_argument("--threads", type=int, default=2, help="CPU threads of the 1-worker runs")
    p.add_argument("--log-every", type=int, default=5,
                   help="steps between ray.train.report calls (quickstart: 5)")
    p.add_argument("--skip-two-workers", action="store_true")
    p.add_argument("--frozen-prefix", action="store_true",
                   help="the frozen-prefix arm instead (train_frozen_prefix.json)")
    args = p.parse_args()
    if args.frozen_prefix:
        frozen_prefix_bench(args)
        return

    import ray
    import torch

    from l2vg_ray.config import load_config

    steps = args.steps or (40 if args.quick else 8)
    work = Path(tempfile.mkdtemp(prefix="l2vg-bench-train-"))
    if args.quick:
        from l2vg_ray.testing import build_tiny_llm

        llm = str(build_tiny_llm(work / "tiny-llm"))
        model = ["model.n_thought=2", "model.n_compression=2", "model.max_length=64",
                 "model.max_response_length=48"]
        teacher_dim, qw, rw = 32, 12, 40
    else:
        llm = "smollm2-135m-instruct"
        model = ["model.n_thought=10", "model.n_compression=10", "model.max_length=128",
                 "model.max_response_length=96"]  # configs/quickstart.yaml
        teacher_dim, qw, rw = 384, 20, 70  # ~25-query / ~90-response tokens: generate.max_tokens=96
    data = make_data(work / "data", rows=max(64, args.batch * (steps + 2)), teacher_dim=teacher_dim,
                     query_words=qw, response_words=rw)
    cfg = load_config(None, [
        f"output_dir={work / 'out'}", f"model.llm={llm}", *model, f"model.teacher_dim={teacher_dim}",
        f"train.data_dir={data}", f"train.batch_size={args.batch}", "train.warmup_steps=2",
        "train.shuffle_buffer=0", f"train.log_every={args.log_every}",
    ])

    results: dict = {}
    print(f"plain loop: {steps} steps, batch {args.batch}, {args.threads} threads", flush=True)
    results["plain"] = plain_loop(cfg, threads=args.threads, steps=steps)
    ray.init(address="local", num_cpus=args.threads, include_dashboard=False, log_to_driver=False)
    try:
        print("ray train, 1 worker", flush=True)
        results["ray-1"] = ray_loop(cfg, workers=1, cpus_per_worker=args.threads, steps=steps)
        if not args.skip_two_workers:
            print("ray train, 2 workers", flush=True)
            results["ray-2"] = ray_loop(cfg, workers=2, cpus_per_worker=args.threads / 2, steps=steps)
    finally:
        ray.shutdown()

    rates = {k: steady_steps_per_s(v["stamps"], args.warmup) for k, v in results.items()}
    out = {
        "benchmark": "train",
        "quick": args.quick,
        "settings": {"llm": llm if not args.quick else "tiny-random-llama", "steps": steps,
                     "log_every": args.log_every,
                     "warmup_steps_excluded": args.warmup, "global_batch": args.batch,
                     "threads": args.threads, "teacher_dim": teacher_dim, "query_words": qw,
                     "response_words": rw, "device": "cpu", "dtype": "float32"},
        "steps_per_s": rates,
        "step_time_s": {k: 1.0 / v for k, v in rates.items()},
        "ratio_ray1_vs_plain": rates["ray-1"] / rates["plain"],
        "ratio_ray2_vs_ray1": rates["ray-2"] / rates["ray-1"] if "ray-2" in rates else None,
        "losses": {k: v["losses"] for k, v in results.items()},
        "run_train_s": {k: v.get("run_train_s") for k, v in results.items()},
        "targets": {"ray1_vs_plain": 0.9, "at_step_s": [0.05, 0.5]},
        "memory": "see bench/results/model_memory.json (bench/model_memory.py): one-copy vs two-copy",
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                    "torch": torch.__version__, "ray": ray.__version__,
                    "loadavg_1m_at_end": os.getloadavg()[0]},
    }
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / ("train_quick.json" if args.quick else "train.json")
    path.write_text(json.dumps(out, indent=2))
    for k, v in rates.items():
        print(f"{k:6s} {v:7.3f} steps/s  ({1 / v:6.2f} s/step)")
    print(f"ray-1 / plain = {out['ratio_ray1_vs_plain']:.3f}  (target >= 0.9)")
    if out["ratio_ray2_vs_ray1"] is not None:
        print(f"ray-2 / ray-1 = {out['ratio_ray2_vs_ray1']:.3f}  (2 cores in all: no speed-up possible)")
    print(f"wrote {path}")
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
