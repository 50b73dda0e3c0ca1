"""A generation driver for the kill test (tests/ray/test_generate_pipeline.py), run as a subprocess.

    python tests/ray/generate_driver.py CONFIG.yaml RAY_ADDRESS

Connects to the test's Ray cluster as a second driver and runs ``run_generate``. After the first
shard is complete, every further shard write stalls between writing its temp file and renaming
it, so that the test can SIGKILL this process in the worst place: one shard done, one half-done.
"""

from __future__ import annotations

import sys
import time

import ray

from l2vg_ray import dataset
from l2vg_ray.config import load_config
from l2vg_ray.generate import pipeline


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
    pipeline.run_generate(cfg)
    print("FINISHED", flush=True)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
