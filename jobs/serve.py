"""Serving as a Ray job: the encoder behind an OpenAI-style POST /v1/embeddings (Ray Serve).

    ray job submit --address http://HEAD:8265 --working-dir . -- \
        python jobs/serve.py --config configs/paper/qwen3-4b.yaml serve.host=0.0.0.0
    l2vg submit serve --address http://HEAD:8265 --config configs/paper/qwen3-4b.yaml

The job blocks while the application serves; stopping the job (`ray job stop ID`) does not remove
a Serve app, `serve shutdown` does. For a long-lived service prefer `serve deploy
configs/serve.yaml` or a KubeRay RayService (cluster/README.md).

The same entry point as ``l2vg serve`` (``l2vg_ray.cli.main``): same flags, same behaviour.
"""

from __future__ import annotations

import sys

from l2vg_ray.cli import main

if __name__ == "__main__":  # the guard matters: vLLM engines spawn processes
    sys.exit(main(["serve", *sys.argv[1:]]))
