"""Evaluation as a Ray job: one Ray task per MTEB task, each requesting `eval.num_gpus_per_task`.

    ray job submit --address http://HEAD:8265 --working-dir . -- \
        python jobs/evaluate.py --config configs/paper/qwen3-4b.yaml eval.suite=mteb-lite
    l2vg submit eval --address http://HEAD:8265 --config configs/paper/qwen3-4b.yaml eval.model=teacher

On an autoscaling cluster the pending GPU tasks are what make the autoscaler add GPU workers.
Tasks that already have results are skipped unless `eval.overwrite=true`.

The same entry point as ``l2vg eval`` (``l2vg_ray.cli.main``): same flags, same behaviour.
"""

from __future__ import annotations

import sys

from l2vg_ray.cli import main

if __name__ == "__main__":  # the guard matters: vLLM engines spawn processes
    sys.exit(main(["eval", *sys.argv[1:]]))
