"""Evaluation as a Ray job: one Ray task per MTEB task, each requesting `eval.num_gpus_per_task`.

    ray job submit --address http://HEAD:8265 --working-dir . -- \
        python jobs/evaluate.py --config configs/paper/qwen3-4b.yaml eval.suite=mteb-lite
    l2vg submit eval --address http://HEAD:8265 --config configs/paper/qwen3-4b.yaml eval.model=teacher

On an autoscaling cluster the pending GPU tasks are what make the autoscaler add GPU workers.
Tasks that already have results are skipped unless `eval.overwrite=true`.
"""

from __future__ import annotations

import argparse
import json
import logging

from l2vg_ray import storage
from l2vg_ray.config import load_config
from l2vg_ray.eval.runner import run_eval
from l2vg_ray.ray_utils import init_ray


def main() -> None:
    parser = argparse.ArgumentParser(description="evaluate an encoder or a baseline")
    parser.add_argument("--config", "-c", help="experiment YAML, e.g. configs/quickstart.yaml")
    parser.add_argument("overrides", nargs="*", help="config overrides, e.g. eval.suite=mteb-lite")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    cfg = storage.absolute_paths(load_config(args.config, args.overrides))
    init_ray(cfg.cluster)  # inside `ray job submit`, RAY_ADDRESS points at the cluster
    summary = run_eval(cfg)

    print(json.dumps(summary, indent=2, default=str))
    print(f"Evaluation results: {cfg.eval.output_dir}")


if __name__ == "__main__":
    main()
