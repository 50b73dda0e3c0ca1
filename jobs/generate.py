"""Generation as a Ray job: queries -> the LLM's own responses -> teacher embeddings -> Parquet.

    ray job submit --address http://HEAD:8265 --working-dir . -- \
        python jobs/generate.py --config configs/paper/qwen3-4b.yaml generate.num_actors=8
    l2vg submit generate --address http://HEAD:8265 --config configs/paper/qwen3-4b.yaml

Rerunning resumes: shards already written for the same queries are kept.
"""

from __future__ import annotations

import argparse
import json
import logging

from l2vg_ray import storage
from l2vg_ray.config import load_config
from l2vg_ray.generate.pipeline import run_generate
from l2vg_ray.ray_utils import init_ray


def main() -> None:
    parser = argparse.ArgumentParser(description="queries -> responses -> teacher embeddings")
    parser.add_argument("--config", "-c", help="experiment YAML, e.g. configs/quickstart.yaml")
    parser.add_argument("overrides", nargs="*", help="config overrides, e.g. generate.num_actors=2")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    cfg = storage.absolute_paths(load_config(args.config, args.overrides))
    init_ray(cfg.cluster)  # inside `ray job submit`, RAY_ADDRESS points at the cluster
    summary = run_generate(cfg)

    print(json.dumps(summary, indent=2, default=str))
    print(f"Generated data: {cfg.generate.output_dir}")


if __name__ == "__main__":  # the guard matters: vLLM engines spawn processes
    main()
