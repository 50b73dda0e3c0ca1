"""The whole pipeline as one Ray job: generate -> train -> evaluate (-> serve + one request).

    ray job submit --address http://HEAD:8265 --working-dir . -- \
        python jobs/pipeline.py --config configs/paper/qwen3-4b.yaml
    l2vg submit pipeline --address http://HEAD:8265 --config configs/paper/qwen3-4b.yaml

Stages whose output already exists for the same config are skipped (markers `_SUCCESS.json`), so
a resubmitted job resumes. Outputs go to `output_dir` (use s3://, gs:// or a shared mount on a
multi-node cluster).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys

from l2vg_ray.config import load_config
from l2vg_ray.pipeline import run_pipeline
from l2vg_ray.ray_utils import init_ray


def main() -> None:
    parser = argparse.ArgumentParser(description="generate -> train -> evaluate (-> serve)")
    parser.add_argument("--config", "-c", help="experiment YAML, e.g. configs/quickstart.yaml")
    parser.add_argument("--serve", action="store_true", help="serve the encoder, send 1 request")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace a stage's output made with a different config")
    parser.add_argument("overrides", nargs="*", help="config overrides, e.g. train.max_steps=10")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    cfg = load_config(args.config, args.overrides)
    init_ray(cfg.cluster)  # inside `ray job submit`, RAY_ADDRESS points at the cluster
    result = run_pipeline(cfg, serve=args.serve, overwrite=args.overwrite)

    print(json.dumps(result, indent=2, default=str))
    if not result["ok"]:  # a stage reported failures: fail the job, a resubmission retries them
        sys.exit(1)


if __name__ == "__main__":  # the guard matters: vLLM engines spawn processes
    main()
