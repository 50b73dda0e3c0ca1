"""Training as a Ray job: the special tokens and the two heads, data-parallel with Ray Train.

    ray job submit --address http://HEAD:8265 --working-dir . -- \
        python jobs/train.py --config configs/paper/qwen3-4b.yaml train.num_workers=8
    l2vg submit train --address http://HEAD:8265 --config configs/paper/qwen3-4b.yaml

Checkpoints go to `cluster.storage_path` (else `train.output_dir`): on a multi-node cluster that
must be s3://, gs:// or a shared mount. `train.resume=true` continues from the last checkpoint.

The same entry point as ``l2vg train`` (``l2vg_ray.cli.main``): same flags, same behaviour.
"""

from __future__ import annotations

import sys

from l2vg_ray.cli import main

if __name__ == "__main__":  # the guard matters: vLLM engines spawn processes
    sys.exit(main(["train", *sys.argv[1:]]))
