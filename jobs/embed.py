"""Bulk embedding as a Ray job: a corpus -> Parquet shards of (id, embedding), exactly once.

    ray job submit --address http://HEAD:8265 --working-dir . -- \
        python jobs/embed.py --config configs/paper/qwen3-8b.yaml \
        embed.input=s3://BUCKET/corpus/ embed.model=hf:McGill-NLP/LLM2Vec-Gen-Qwen3-8B \
        embed.num_actors=8 embed.num_gpus_per_actor=1
    l2vg submit embed --address http://HEAD:8265 --config configs/laptop.yaml embed.input=...

Rerunning resumes: texts already in complete shards are not embedded again.
"""

from __future__ import annotations

import argparse
import json
import logging

from l2vg_ray import storage
from l2vg_ray.config import load_config
from l2vg_ray.embed import run_embed
from l2vg_ray.ray_utils import init_ray


def main() -> None:
    parser = argparse.ArgumentParser(description="a corpus -> embeddings (Ray Data)")
    parser.add_argument("--config", "-c", help="experiment YAML, e.g. configs/laptop.yaml")
    parser.add_argument("overrides", nargs="*", help="config overrides, e.g. embed.input=docs/")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    cfg = storage.absolute_paths(load_config(args.config, args.overrides))
    init_ray(cfg.cluster)  # inside `ray job submit`, RAY_ADDRESS points at the cluster
    summary = run_embed(cfg)

    print(json.dumps({k: v for k, v in summary.items() if k != "config"}, indent=2, default=str))
    print(f"Embeddings: {cfg.embed.output_dir}")


if __name__ == "__main__":
    main()
