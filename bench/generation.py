"""Generation throughput: vLLM(-CPU) vs transformers batched ``generate``, standalone and in Ray Data.

Run it with the vLLM environment's python (it needs both engines; ``make vllm-env`` builds it):

    .venv-vllm/bin/python bench/generation.py            # 64 prompts x 64 tokens, ~5-8 min here
    .venv-vllm/bin/python bench/generation.py --quick    # 16 prompts x 16 tokens

Same model (SmolLM2-135M-Instruct, float32), same chat prompts, greedy, same ``max_tokens`` and
the same batches for every measurement. Four numbers, measured side by side in one run:

- standalone: ``Backend.generate`` on each batch in this process (after one warm-up call);
- Ray Data: ``GenerateStage`` in a 1-actor pool (``num_cpus`` = the standalone thread count) over
  the same rows, timed from the first batch entering the built, warmed-up actor to the last row
  back in the driver (steady state; the one-time worker start and engine build are reported
  apart, as ``actor_init_s`` and ``wall_s``);
- Ray Data, vLLM with ``generate.max_concurrent_batches`` = ``--concurrent-batches``: several
  batches in flight per actor, their requests sharing the engine's steps (``EngineLoop``).

Tokens are response tokens (stop token excluded), counted identically for both engines. Writes
``bench/results/generation.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import _common  # noqa: F401  (environment and sys.path)

# Before torch / Ray start: inherited by the Ray workers (see ../shared/ENVIRONMENT.md).
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")

TOPICS = [
    "the water cycle",
    "black holes",
    "the French Revolution",
    "photosynthesis",
    "machine learning",
    "the stock market",
    "volcanoes",
    "the immune system",
    "climate change",
    "the Roman Empire",
    "quantum computing",
    "honey bees",
    "the printing press",
    "electric cars",
    "sleep",
    "coffee",
]
TEMPLATES = [
    "Explain {} in simple terms.",
    "Give me three interesting facts about {}.",
    "Write a short paragraph about {} for a school newsletter.",
    "What are the most common misconceptions about {}?",
]
PROMPTS = [t.format(topic) for t in TEMPLATES for topic in TOPICS]  # 64


class TimedGenerateStage:
    """GenerateStage plus timings: construction + warm-up, and each call, as extra columns."""

    def __init__(self, **stage_args) -> None:
        from l2vg_ray.generate.stages import GenerateStage

        t0 = time.perf_counter()
        self.stage = GenerateStage(**stage_args)
        self.stage.backend.generate(PROMPTS[:1])  # warm-up, as standalone
        self.init_s = time.perf_counter() - t0

    def __call__(self, batch):
        import numpy as np

        t_start = time.time()  # wall clock: comparable with the driver's on one machine
        out = self.stage(batch)
        n = len(out["query"])
        # Each row carries its batch's share, so that summing over rows gives the calls' total.
        out["_call_s"] = np.full(n, (time.time() - t_start) / max(n, 1))
        out["_t_start"] = np.full(n, t_start)
        out["_init_s"] = np.full(n, self.init_s)
        return out


def build_cfg(backend: str, args, concurrent: int = 1):
    from l2vg_ray.config import load_config, typed

    return typed(
        load_config(
            None,
            [
                "model.llm=smollm2-135m-instruct",
                "model.dtype=float32",
                f"generate.backend={backend}",
                "generate.temperature=0.0",
                f"generate.max_tokens={args.max_tokens}",
                f"generate.batch_size={args.batch_size}",
                "generate.num_actors=1",
                f"generate.num_cpus_per_actor={args.threads}",
                f"generate.max_concurrent_batches={concurrent}",
            ],
        )
    )


def standalone(backend: str, prompts: list[str], args) -> dict:
    import torch

    from l2vg_ray.generate.backends import build_backend

    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    cfg = build_cfg(backend, args)
    engine = build_backend(cfg.model, cfg.generate, cfg.cache_dir)
    engine.generate(prompts[:1])  # warm-up
    startup_s = time.perf_counter() - t0
    texts, tokens = [], 0
    t0 = time.perf_counter()
    for i in range(0, len(prompts), args.batch_size):
        for g in engine.generate(prompts[i : i + args.batch_size]):
            texts.append(g.text)
            tokens += g.n_tokens
    seconds = time.perf_counter() - t0
    print(
        f"  {backend:12s} standalone: {tokens} tokens in {seconds:.1f} s = {tokens / seconds:.1f} tok/s "
        f"(start-up {startup_s:.1f} s)",
        flush=True,
    )
    return {
        "tokens": tokens,
        "seconds": seconds,
        "tok_s": tokens / seconds,
        "startup_s": startup_s,
        "texts": texts,
    }


def in_ray_data(backend: str, prompts: list[str], args, concurrent: int = 1) -> dict:
    import ray.data

    from l2vg_ray import schema
    from l2vg_ray.generate.stages import generate_stage_kwargs

    cfg = build_cfg(backend, args, concurrent)
    rows = [{schema.ID: schema.query_id(q), schema.QUERY: q} for q in prompts]
    ds = ray.data.from_items(rows, override_num_blocks=max(1, len(rows) // args.batch_size))
    ds = ds.map_batches(TimedGenerateStage, batch_format="numpy", **generate_stage_kwargs(cfg))
    t0 = time.time()
    out = ds.take_all()
    t_end = time.time()
    init_s = float(out[0]["_init_s"])
    calls_s = sum(float(r["_call_s"]) for r in out)
    tokens = int(sum(int(r[schema.RESPONSE_TOKENS]) for r in out))
    # Steady state: from the first batch entering the (started, warmed-up) actor to the last
    # row back in the driver. The one-time worker start and engine build are reported apart.
    seconds = t_end - min(float(r["_t_start"]) for r in out)
    by_query = {r[schema.QUERY]: r[schema.RESPONSE] for r in out}
    label = f"{backend} x{concurrent}" if concurrent > 1 else backend
    print(
        f"  {label:12s} Ray Data:   {tokens} tokens in {seconds:.1f} s = {tokens / seconds:.1f} tok/s "
        f"(actor start-up {init_s:.1f} s, inside the actor's calls {calls_s:.1f} s)",
        flush=True,
    )
    return {
        "tokens": tokens,
        "seconds": seconds,
        "tok_s": tokens / seconds,
        "actor_init_s": init_s,
        "seconds_in_calls": calls_s,
        "wall_s": t_end - t0,
        "texts": [by_query[q] for q in prompts],
    }


def compute_ratios(results: dict[str, dict]) -> dict[str, float]:
    """Speed-up of vLLM and the cost of Ray Data, from the four measurements.

    ``ray_overhead_*`` compares two runs made minutes apart (sensitive to load drift on a shared
    machine); ``ray_time_outside_calls_*`` is measured within the one Ray run: the share of its
    steady-state time spent outside the engine calls (scheduling, transfers, the driver).
    """
    hf, vl = results["transformers_standalone"], results["vllm_standalone"]
    hf_ray, vl_ray = results["transformers_ray"], results["vllm_ray"]
    return {
        "vllm_over_transformers_standalone": vl["tok_s"] / hf["tok_s"],
        "vllm_over_transformers_ray": vl_ray["tok_s"] / hf_ray["tok_s"],
        "ray_overhead_transformers": 1 - hf_ray["tok_s"] / hf["tok_s"],
        "ray_overhead_vllm": 1 - vl_ray["tok_s"] / vl["tok_s"],
        "ray_time_outside_calls_transformers": 1 - hf_ray["seconds_in_calls"] / hf_ray["seconds"],
        "ray_time_outside_calls_vllm": 1 - vl_ray["seconds_in_calls"] / vl_ray["seconds"],
        **({
            "vllm_concurrent_over_transformers_ray":
                results["vllm_ray_concurrent"]["tok_s"] / hf_ray["tok_s"],
            "vllm_concurrent_over_vllm_ray": results["vllm_ray_concurrent"]["tok_s"] / vl_ray["tok_s"],
            "vllm_concurrent_ray_over_vllm_standalone":
                results["vllm_ray_concurrent"]["tok_s"] / vl["tok_s"],
        } if "vllm_ray_concurrent" in results else {}),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="16 prompts x 16 tokens")
    parser.add_argument("--n-prompts", type=int, default=64)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--threads", type=int, default=1, help="torch threads = actor num_cpus")
    parser.add_argument("--concurrent-batches", type=int, default=4,
                        help="generate.max_concurrent_batches of the last Ray Data run (1 = skip it)")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "generation.json"))
    args = parser.parse_args()
    if args.quick:
        args.n_prompts, args.max_tokens, args.batch_size = 16, 16, 8
    n = args.n_prompts
    prompts = (PROMPTS * (n // len(PROMPTS) + 1))[:n] if n > len(PROMPTS) else PROMPTS[:n]

    from l2vg_ray.generate.backends import vllm_platform

    if vllm_platform() is None:
        sys.exit(
            "vLLM cannot run in this interpreter. Run with .venv-vllm/bin/python "
            "(`make vllm-env` builds it)."
        )
    from l2vg_ray.models import resolve_model

    resolve_model("smollm2-135m-instruct")  # converted once, before any timing
    load_before = os.getloadavg()
    t_start = time.perf_counter()
    print(
        f"{n} prompts x max {args.max_tokens} tokens, batches of {args.batch_size}, "
        f"{args.threads} thread(s); load average {load_before[0]:.2f}",
        flush=True,
    )

    results: dict[str, dict] = {}
    # transformers standalone first: an in-process vLLM engine re-binds this process's threads.
    results["transformers_standalone"] = standalone("transformers", prompts, args)
    import ray

    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        results["transformers_ray"] = in_ray_data("transformers", prompts, args)
        results["vllm_ray"] = in_ray_data("vllm", prompts, args)
        if args.concurrent_batches > 1:
            results["vllm_ray_concurrent"] = in_ray_data("vllm", prompts, args,
                                                         args.concurrent_batches)
    finally:
        ray.shutdown()
    results["vllm_standalone"] = standalone("vllm", prompts, args)

    hf, vl = results["transformers_standalone"], results["vllm_standalone"]
    same = sum(a == b for a, b in zip(hf["texts"], vl["texts"], strict=True))
    same_ray = sum(
        a == b
        for a, b in zip(
            results["transformers_ray"]["texts"], results["vllm_ray"]["texts"], strict=True
        )
    )
    ratios = compute_ratios(results)
    print(
        f"\nvLLM / transformers:  standalone {ratios['vllm_over_transformers_standalone']:.2f}x, "
        f"in Ray Data {ratios['vllm_over_transformers_ray']:.2f}x   (target >= 3x)"
    )
    print(
        f"Ray Data overhead vs standalone run: transformers "
        f"{ratios['ray_overhead_transformers']:+.1%}, vLLM {ratios['ray_overhead_vllm']:+.1%}   "
        f"(target < 15%; two runs at different moments, so machine load drift enters)"
    )
    print(
        f"Ray Data time outside the engine calls (same run): transformers "
        f"{ratios['ray_time_outside_calls_transformers']:.2%}, vLLM "
        f"{ratios['ray_time_outside_calls_vllm']:.2%}"
    )
    same_concurrent = None
    if "vllm_ray_concurrent" in results:
        same_concurrent = sum(a == b for a, b in zip(results["transformers_ray"]["texts"],
                                                     results["vllm_ray_concurrent"]["texts"], strict=True))
        print(f"vLLM with {args.concurrent_batches} concurrent batches in Ray Data: "
              f"{ratios['vllm_concurrent_over_transformers_ray']:.2f}x transformers, "
              f"{ratios['vllm_concurrent_over_vllm_ray']:.2f}x one batch at a time, "
              f"{ratios['vllm_concurrent_ray_over_vllm_standalone']:.2f}x standalone vLLM")
    print(
        f"greedy texts identical (vLLM vs transformers): standalone {same}/{n}, Ray Data {same_ray}/{n}"
        + (f", Ray Data concurrent {same_concurrent}/{n}" if same_concurrent is not None else "")
    )

    import torch
    import transformers
    import vllm

    report = {
        "benchmark": "generation",
        "model": "smollm2-135m-instruct (float32)",
        "n_prompts": n,
        "max_tokens": args.max_tokens,
        "batch_size": args.batch_size,
        "threads": args.threads,
        "greedy": True,
        "quick": args.quick,
        "results": {k: {m: v for m, v in r.items() if m != "texts"} for k, r in results.items()},
        "ratios": ratios,
        "concurrent_batches": args.concurrent_batches,
        "greedy_identical": {"standalone": same, "ray": same_ray, "ray_concurrent": same_concurrent,
                             "of": n},
        "targets": {"vllm_over_transformers": 3.0, "ray_overhead_max": 0.15,
                    "vllm_concurrent_ray_over_vllm_standalone": 0.9},
        "machine": {
            "cpu_count": os.cpu_count(),
            "load_average_before": load_before[0],
            "load_average_after": os.getloadavg()[0],
            "platform": platform.platform(),
            "python": platform.python_version(),
        },
        "versions": {
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "vllm": vllm.__version__,
            "ray": ray.__version__,
        },
        "env": {
            k: os.environ.get(k)
            for k in (
                "VLLM_ENABLE_V1_MULTIPROCESSING",
                "VLLM_CPU_KVCACHE_SPACE",
                "VLLM_CPU_OMP_THREADS_BIND",
                "OMP_WAIT_POLICY",
            )
        },
        "total_seconds": time.perf_counter() - t_start,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":  # vLLM may spawn processes that re-import this module
    main()
