"""Memory of one LLM2Vec-Gen training step: one frozen LLM copy vs a second decoder copy.

The original code keeps two copies of the LLM (an encoder and a decoder); l2vg-ray's
``L2VGEncoder`` runs the reconstruction through the same frozen LLM. This benchmark builds each
design in its own subprocess (so one cannot inherit the other's allocator high-water mark) and
measures, for one forward+backward at batch 8 with realistic lengths:

- resident memory after imports, after loading the model(s), and its peak during the step
  (``/proc/self/statm`` sampled every 2 ms by a thread; ``ru_maxrss`` too), on CPU;
  ``torch.cuda.max_memory_allocated`` when run with ``--device cuda``;
- step time (second step; the first warms up);
- trainable parameter count and the checkpoint size written by ``L2VGEncoder.save``.

Usage: ``python bench/model_memory.py [--quick] [--threads 1] [--device cpu]``; writes
``bench/results/model_memory.json`` (``model_memory_quick.json`` with ``--quick``).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
DESIGNS = ("one-copy", "two-copy", "one-copy-checkpointing")
WORDS = (
    "the a of to and in is it that for on with as was by at be this from or an are not have "
    "which one you had but were all when there can we what their more if will about so time "
    "model data train query answer light water river city energy network language method "
    "result value system people history science music market health policy theory"
).split()


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class PeakRss:
    """Samples this process's resident memory in a thread; ``peak`` is the highest seen."""

    def __init__(self, interval_s: float = 0.002) -> None:
        self.interval_s = interval_s
        self.peak = _rss_bytes()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, _rss_bytes())
            time.sleep(self.interval_s)

    def __enter__(self) -> PeakRss:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _rss_bytes())


def _texts(n: int, lo: int, hi: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(lo, hi))) for _ in range(n)]


def _use_second_copy(encoder) -> None:  # noqa: ANN001
    """Make ``encoder`` reconstruct through a deep-copied decoder LLM (the original's design)."""
    import copy
    import types

    from l2vg_ray.method.model import interleave_soft_prompts, position_ids_from_mask

    encoder.decoder = copy.deepcopy(encoder.llm)

    def reconstruction_logits(self, soft_prompts, response_input_ids, response_attention_mask):  # noqa: ANN001, ANN202
        r = response_input_ids.shape[1]
        embeds, mask = interleave_soft_prompts(
            self.decoder.get_input_embeddings()(response_input_ids),
            response_attention_mask,
            soft_prompts.to(self.llm_dtype),
        )
        out = self.decoder(
            inputs_embeds=embeds,
            attention_mask=mask,
            position_ids=position_ids_from_mask(mask),
            use_cache=False,
            logits_to_keep=r + 1,
        )
        return out.logits[:, :-1]

    encoder.reconstruction_logits = types.MethodType(reconstruction_logits, encoder)


def child(args: argparse.Namespace) -> dict:
    """One design, in this (fresh) process."""
    import torch

    torch.set_num_threads(args.threads)
    from l2vg_ray.config import ModelConfig
    from l2vg_ray.method import L2VGEncoder

    rss_imports = _rss_bytes()
    cfg = ModelConfig(
        llm=args.llm,
        teacher=args.teacher,
        teacher_dim=args.teacher_dim,
        n_thought=10,
        n_compression=10,
        max_length=args.max_length,
        max_response_length=args.max_response_length,
        dtype=args.dtype,
        device=args.device,
        gradient_checkpointing=args.design == "one-copy-checkpointing",
    )
    t0 = time.perf_counter()
    encoder = L2VGEncoder.from_config(cfg)
    if args.design == "two-copy":
        _use_second_copy(encoder)
    # Weights may be mmapped from safetensors and only paged in when first read: read them all
    # now, so that "after load" is the resident model and the step's increase is activations.
    with torch.no_grad():
        for prm in encoder.parameters():
            prm.sum()
    load_s = time.perf_counter() - t0
    rss_loaded = _rss_bytes()
    storages = {
        prm.untyped_storage().data_ptr(): prm.untyped_storage().nbytes()
        for prm in encoder.parameters()
    }
    param_bytes = sum(storages.values())
    frozen = sum(p.numel() for p in encoder.parameters() if not p.requires_grad)
    trainable = sum(p.numel() for p in encoder.trainable_parameters())

    queries = _texts(args.batch, args.query_words[0], args.query_words[1], seed=1)
    responses = _texts(args.batch, args.response_words[0], args.response_words[1], seed=2)
    teacher = torch.randn(args.batch, encoder.dim, generator=torch.Generator().manual_seed(3))
    batch = encoder.prepare_batch(queries, responses, teacher)
    encoder.train()
    cuda = encoder.device.type == "cuda"
    steps = []
    for _ in range(2):
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        with PeakRss() as peak:
            out = encoder(batch)
            out.loss.backward()
            if cuda:
                torch.cuda.synchronize()
        steps.append(
            {
                "time_s": time.perf_counter() - start,
                "peak_rss_bytes": peak.peak,
                "cuda_peak_bytes": torch.cuda.max_memory_allocated() if cuda else None,
            }
        )
        for p in encoder.trainable_parameters():
            p.grad = None

    with tempfile.TemporaryDirectory() as d:
        encoder.save(d)
        files = {f.name: f.stat().st_size for f in Path(d).iterdir()}
    return {
        "design": args.design,
        "device": str(encoder.device),
        "frozen_params": frozen,
        "trainable_params": trainable,
        "param_bytes": param_bytes,
        "checkpoint_bytes": sum(files.values()),
        "checkpoint_files": files,
        "query_tokens": list(batch["query_input_ids"].shape),
        "response_tokens": list(batch["response_input_ids"].shape),
        "n_response_tokens": int(out.n_response_tokens),
        "load_s": load_s,
        "rss_after_imports_bytes": rss_imports,
        "rss_after_load_bytes": rss_loaded,
        "step_peak_rss_bytes": max(s["peak_rss_bytes"] for s in steps),
        "step_rss_increase_bytes": max(s["peak_rss_bytes"] for s in steps) - rss_loaded,
        "ru_maxrss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "cuda_peak_bytes": steps[-1]["cuda_peak_bytes"],
        "step_time_s": steps[-1]["time_s"],
        "first_step_time_s": steps[0]["time_s"],
        "recon_loss": float(out.recon_loss),
        "align_loss": float(out.align_loss),
    }


def _mib(x: float | None) -> str:
    return "-" if x is None else f"{x / 2**20:8.1f}"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--quick", action="store_true", help="batch 2, short texts")
    p.add_argument("--llm", default="smollm2-135m-instruct")
    p.add_argument("--teacher", default="all-minilm-l6-v2")
    p.add_argument("--teacher-dim", type=int, default=384)
    p.add_argument("--dtype", default="float32")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--designs", default=",".join(DESIGNS))
    p.add_argument("--out", default=None)
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.quick:
        args.batch, args.max_length, args.max_response_length = 2, 64, 48
        args.query_words, args.response_words = (10, 20), (20, 40)
    else:  # quickstart.yaml lengths: queries up to 128 tokens (20 special), responses up to 96
        args.batch, args.max_length, args.max_response_length = 8, 128, 96
        args.query_words, args.response_words = (30, 90), (50, 120)

    if args.child:
        args.design = args.child
        print(json.dumps(child(args)))
        return

    designs = [d for d in args.designs.split(",") if d]
    unknown = sorted(set(designs) - set(DESIGNS))
    if unknown:
        raise SystemExit(f"Unknown designs {unknown}; choose from {list(DESIGNS)}.")
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "TOKENIZERS_PARALLELISM": "false"}
    env.setdefault("HF_HUB_OFFLINE", "1")
    results = {}
    for design in designs:
        cmd = [sys.executable, __file__, "--child", design, *sys.argv[1:]]
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if proc.returncode != 0:
            sys.stderr.write(proc.stderr[-4000:])
            raise SystemExit(f"design {design} failed (exit {proc.returncode})")
        results[design] = json.loads(proc.stdout.strip().splitlines()[-1])
        r = results[design]
        print(
            f"{design:24s} weights+libs {_mib(r['rss_after_load_bytes'])} MiB  "
            f"step peak {_mib(r['step_peak_rss_bytes'])} MiB  "
            f"(+{_mib(r['step_rss_increase_bytes']).strip()} in step)  "
            f"cuda peak {_mib(r['cuda_peak_bytes'])}  step {r['step_time_s']:.2f} s",
            flush=True,
        )

    ratios = {}
    base = results.get("one-copy")
    if base:
        for name, r in results.items():
            if name == "one-copy":
                continue
            ratios[f"{name}/one-copy"] = {
                "step_peak_rss": r["step_peak_rss_bytes"] / base["step_peak_rss_bytes"],
                "model_resident": (r["rss_after_load_bytes"] - r["rss_after_imports_bytes"])
                / (base["rss_after_load_bytes"] - base["rss_after_imports_bytes"]),
                "param_bytes": r["param_bytes"] / base["param_bytes"],
                "step_time": r["step_time_s"] / base["step_time_s"],
                **(
                    {"cuda_peak": r["cuda_peak_bytes"] / base["cuda_peak_bytes"]}
                    if base["cuda_peak_bytes"]
                    else {}
                ),
            }
        print(
            f"trainable params {base['trainable_params']:,} of {base['frozen_params']:,} frozen; "
            f"checkpoint {base['checkpoint_bytes'] / 1e6:.2f} MB"
        )
        for name, rr in ratios.items():
            print(f"{name}: " + ", ".join(f"{k} x{v:.2f}" for k, v in rr.items()))
    payload = {
        "benchmark": "model_memory",
        "quick": args.quick,
        "settings": {
            k: getattr(args, k)
            for k in (
                "llm",
                "teacher_dim",
                "dtype",
                "device",
                "threads",
                "batch",
                "max_length",
                "max_response_length",
            )
        },
        "designs": results,
        "ratios": ratios,
        "note": "RSS includes Python, torch and transformers (see rss_after_imports_bytes); "
        "model_resident = rss_after_load - rss_after_imports.",
    }
    out = (
        Path(args.out)
        if args.out
        else RESULTS / ("model_memory_quick.json" if args.quick else "model_memory.json")
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(payload, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
