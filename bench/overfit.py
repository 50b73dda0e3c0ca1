"""Capacity check: can the student fit a handful of examples to near-zero alignment loss?

    python bench/overfit.py [--data outputs/laptop/data] [--rows 64] [--steps 300]

Takes the first ``--rows`` rows of a generated data set (the laptop recipe's by default) and
trains the encoder of ``--config`` on them alone, alignment term only (``--batch-size``), with the
recipe's initialisation (prompt-initialised tokens, calibrated heads) and its optimiser. A model
and optimisation that work drive the training MSE far below the mean-vector guess on those rows;
one that cannot fit 64 examples cannot learn anything. Prints the curve and writes
``bench/results/overfit.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

from _common import ROOT


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--config", default=str(ROOT / "configs" / "laptop.yaml"))
    p.add_argument("--data", default=str(ROOT / "outputs" / "laptop" / "data"))
    p.add_argument("--rows", type=int, default=64)
    p.add_argument("--steps", type=int, default=120)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--eval-every", type=int, default=20)
    p.add_argument("--lr-heads", type=float, default=None,
                   help="heads' learning rate (default: the config's train.lr_heads)")
    p.add_argument("--out", default=str(ROOT / "bench" / "results" / "overfit.json"))
    args = p.parse_args(argv)

    import glob

    import pyarrow.parquet as pq
    import torch

    from l2vg_ray.config import load_config
    from l2vg_ray.method.losses import TargetStats
    from l2vg_ray.method.model import L2VGEncoder

    cfg = load_config(args.config, [])
    files = sorted(glob.glob(os.path.join(args.data, "*.parquet")))
    if not files:
        raise SystemExit(f"No Parquet shards under {args.data!r}: generate the data first.")
    rows = pq.read_table(files[0], columns=["query", "response", "teacher_embedding"])
    rows = rows.slice(0, args.rows).to_pylist()
    if len(rows) < args.rows:
        raise SystemExit(f"{files[0]} holds {len(rows)} rows, fewer than --rows {args.rows}.")
    torch.manual_seed(cfg.seed)
    enc = L2VGEncoder.from_config(cfg.model, cache_dir=cfg.cache_dir, device="cpu")
    targets = torch.tensor([r["teacher_embedding"] for r in rows])
    stats = TargetStats.from_targets(targets)
    queries = [r["query"] for r in rows]
    enc.calibrate_heads(queries, target_mean=stats.mean, target_std=stats.mean_vector_mse ** 0.5)
    batches = [
        enc.prepare_batch(queries[i : i + args.batch_size],
                          teacher_embeddings=targets[i : i + args.batch_size])
        for i in range(0, len(rows), args.batch_size)
    ]

    heads = {id(q) for q in enc.head_parameters()}
    lr_heads = args.lr_heads if args.lr_heads is not None else (cfg.train.lr_heads or cfg.train.lr)
    opt = torch.optim.AdamW([
        {"params": [q for q in enc.trainable_parameters() if id(q) not in heads], "lr": cfg.train.lr},
        {"params": enc.head_parameters(), "lr": lr_heads},
    ], weight_decay=0.0)
    mean_mse = stats.mean_vector_mse
    print(f"{len(rows)} rows; mean-vector MSE on them {mean_mse:.5f}, zero vector "
          f"{stats.zero_vector_mse:.5f}")
    enc.train(True)
    curve, t0 = [], time.perf_counter()
    def measure(step: int) -> None:
        with torch.no_grad():
            emb = torch.cat([enc(b, recon_weight=0.0, align_weight=0.0).embeddings for b in batches])
        mse = float((emb - targets).pow(2).mean())
        cos = float(torch.nn.functional.cosine_similarity(emb, targets).mean())
        curve.append({"step": step, "mse": mse, "cos": cos})
        print(f"step {step:4d}  MSE on the {len(rows)} rows {mse:.6f} "
              f"({mse / mean_mse:.3f} x mean-vector)  cos {cos:.3f}", flush=True)

    measure(0)
    for step in range(1, args.steps + 1):
        out = enc(batches[(step - 1) % len(batches)], recon_weight=0.0, align_weight=1.0,
                  align_loss="mse")
        opt.zero_grad(set_to_none=True)
        out.align_loss.backward()
        opt.step()
        if step % args.eval_every == 0 or step == args.steps:
            measure(step)
    result = {
        "benchmark": "overfit",
        "config": os.path.relpath(args.config, ROOT),
        "rows": len(rows), "steps": args.steps, "batch_size": args.batch_size, "lr_tokens": cfg.train.lr, "lr_heads": lr_heads,
        "mean_vector_mse": mean_mse, "zero_vector_mse": stats.zero_vector_mse,
        "final_mse": curve[-1]["mse"], "final_cos": curve[-1]["cos"],
        "final_vs_mean_vector": curve[-1]["mse"] / mean_mse,
        "curve": curve, "wall_s": round(time.perf_counter() - t0, 1),
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"final MSE {result['final_mse']:.6f} = {result['final_vs_mean_vector']:.3f} x the "
          f"mean-vector guess; wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
