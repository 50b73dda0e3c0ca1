"""The whole pipeline as one Ray job: generate -> train -> evaluate (-> serve + one request).

    ray job submit --address http://HEAD:8265 --working-dir . -- \
        python jobs/pipeline.py --config configs/paper/qwen3-4b.yaml
    l2vg submit pipeline --address http://HEAD:8265 --config configs/paper/qwen3-4b.yaml

Stages whose output already exists for the same config are skipped (markers `_SUCCESS.json`), so
a resubmitted job resumes. Outputs go to `output_dir` (use s3://, gs:// or a shared mount on a
multi-node cluster).

The same entry point as ``l2vg run`` (``l2vg_ray.cli.main``): same flags, same behaviour.
"""

from __future__ import annotations

import sys

from l2vg_ray.cli import main

if __name__ == "__main__":  # the guard matters: vLLM engines spawn processes
    sys.exit(main(["run", *sys.argv[1:]]))
