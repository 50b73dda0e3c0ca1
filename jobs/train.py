"""Training as a Ray job: the special tokens and the two heads, data-parallel with Ray Train.

    ray job submit --address http://HEAD:8265 --working-dir . -- \
        python jobs/train.py --config configs/paper/qwen3-4b.yaml train.num_workers=8
    l2vg submit train --address http://HEAD:8265 --config configs/paper/qwen3-4b.yaml

Checkpoints go to `cluster.storage_path` (else `train.output_dir`): on a multi-node cluster that
must be s3://, gs:// or a shared mount. `train.resume=true` continues from the last checkpoint.
"""

from __future__ import annotations

import argparse
import json
import logging

from l2vg_ray import storage
from l2vg_ray.config import load_config
from l2vg_ray.ray_utils import init_ray
from l2vg_ray.train.trainer import run_train


def main() -> None:
    parser = argparse.ArgumentParser(description="train the special tokens and heads")
    parser.add_argument("--config", "-c", help="experiment YAML, e.g. configs/quickstart.yaml")
    parser.add_argument("--resume", action="store_true", help="continue from the last checkpoint")
    parser.add_argument("overrides", nargs="*", help="config overrides, e.g. train.lr=1e-4")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    overrides = args.overrides + (["train.resume=true"] if args.resume else [])
    cfg = storage.absolute_paths(load_config(args.config, overrides))
    init_ray(cfg.cluster)  # inside `ray job submit`, RAY_ADDRESS points at the cluster
    summary = run_train(cfg)

    print(json.dumps(summary, indent=2, default=str))
    print(f"Trained encoder under: {cfg.train.output_dir}")


if __name__ == "__main__":
    main()
