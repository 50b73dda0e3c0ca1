"""An embed driver for the kill test (tests/ray/test_embed.py), run as a subprocess.

    python tests/ray/embed_driver.py CONFIG.yaml RAY_ADDRESS

Runs ``run_embed`` as a second driver of the test's Ray cluster; after the first shard every
further shard write stalls between its temp file and the rename, so the test can SIGKILL it with
one shard done and one half-written.
"""

from __future__ import annotations

import sys
import time

import ray

from l2vg_ray import dataset, embed
from l2vg_ray.config import load_config


def _stall_after_first_shard() -> None:
    original = dataset.OutputDir.write_atomic

    def write_atomic(self, name, write):
        if not (name.startswith("part-") and self.shards()):
            return original(self, name, write)

        def write_then_stall(tmp):
            write(tmp)
            print(f"STALLED before renaming {tmp}", flush=True)
            time.sleep(600)

        return original(self, name, write_then_stall)

    dataset.OutputDir.write_atomic = write_atomic


def main(config_path: str, address: str) -> None:
    cfg = load_config(config_path)
    _stall_after_first_shard()
    ray.init(address=address, log_to_driver=False)
    embed.run_embed(cfg)
    print("FINISHED", flush=True)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
