"""Generation as a Ray job: queries -> the LLM's own responses -> teacher embeddings -> Parquet.

    ray job submit --address http://HEAD:8265 --working-dir . -- \
        python jobs/generate.py --config configs/paper/qwen3-4b.yaml generate.num_actors=8
    l2vg submit generate --address http://HEAD:8265 --config configs/paper/qwen3-4b.yaml

Rerunning resumes: shards already written for the same queries are kept.

The same entry point as ``l2vg generate`` (``l2vg_ray.cli.main``): same flags, same behaviour.
"""

from __future__ import annotations

import sys

from l2vg_ray.cli import main

if __name__ == "__main__":  # the guard matters: vLLM engines spawn processes
    sys.exit(main(["generate", *sys.argv[1:]]))
