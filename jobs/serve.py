"""Serving as a Ray job: the encoder behind an OpenAI-style POST /v1/embeddings (Ray Serve).

    ray job submit --address http://HEAD:8265 --working-dir . -- \
        python jobs/serve.py --config configs/paper/qwen3-4b.yaml serve.host=0.0.0.0
    l2vg submit serve --address http://HEAD:8265 --config configs/paper/qwen3-4b.yaml

The job blocks while the application serves; stopping the job (`ray job stop ID`) does not remove
a Serve app, `serve shutdown` does. For a long-lived service prefer `serve deploy
configs/serve.yaml` or a KubeRay RayService (cluster/README.md).
"""

from __future__ import annotations

import argparse
import json
import logging

from l2vg_ray import storage
from l2vg_ray.config import load_config
from l2vg_ray.ray_utils import init_ray
from l2vg_ray.serve.app import run_serve


def main() -> None:
    parser = argparse.ArgumentParser(description="serve an encoder over HTTP")
    parser.add_argument("--config", "-c", help="experiment YAML, e.g. configs/quickstart.yaml")
    parser.add_argument("overrides", nargs="*", help="config overrides, e.g. serve.port=8000")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    cfg = storage.absolute_paths(load_config(args.config, args.overrides))
    init_ray(cfg.cluster)  # inside `ray job submit`, RAY_ADDRESS points at the cluster
    print(f"Serving {cfg.serve.model} as {cfg.serve.model_name!r} on {cfg.serve.host}:{cfg.serve.port}")
    summary = run_serve(cfg, blocking=True)

    print(json.dumps(summary, indent=2, default=str))


if __name__ == "__main__":
    main()
