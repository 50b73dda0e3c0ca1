"""An LLM2Vec teacher of a decoder as a Ray job: bidirectional attention, MNTP LoRA, then
unsupervised SimCSE LoRA, on Ray Train. Its output loads through ``teacher.kind: llm2vec``.

    ray job submit --address http://HEAD:8265 --working-dir . -- \
        python jobs/llm2vec.py --config configs/laptop-unsup.yaml llm2vec.num_workers=4
    l2vg submit llm2vec --address http://HEAD:8265 --config configs/laptop-unsup.yaml

Rerunning resumes: a finished step is skipped, an interrupted one continues from its checkpoint.

The same entry point as ``l2vg llm2vec`` (``l2vg_ray.cli.main``): same flags, same behaviour.
"""

from __future__ import annotations

import sys

from l2vg_ray.cli import main

if __name__ == "__main__":
    sys.exit(main(["llm2vec", *sys.argv[1:]]))
