"""Bulk embedding as a Ray job: a corpus -> Parquet shards of (id, embedding), exactly once.

    ray job submit --address http://HEAD:8265 --working-dir . -- \
        python jobs/embed.py --config configs/paper/qwen3-8b.yaml \
        embed.input=s3://BUCKET/corpus/ embed.model=hf:McGill-NLP/LLM2Vec-Gen-Qwen3-8B \
        embed.num_actors=8 embed.num_gpus_per_actor=1
    l2vg submit embed --address http://HEAD:8265 --config configs/laptop.yaml embed.input=...

Rerunning resumes: texts already in complete shards are not embedded again.

The same entry point as ``l2vg embed`` (``l2vg_ray.cli.main``): same flags, same behaviour.
"""

from __future__ import annotations

import sys

from l2vg_ray.cli import main

if __name__ == "__main__":  # the guard matters: vLLM engines spawn processes
    sys.exit(main(["embed", *sys.argv[1:]]))
