"""What every benchmark sets up before it imports torch, transformers or Ray.

``import _common`` (the benchmarks run as ``python bench/<name>.py``, so this folder is on the
path) puts the repository root on ``sys.path`` and sets the environment of an offline, quiet
run on a throwaway loopback cluster (values already set win).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"

BENCH_ENV = {
    "HF_HUB_OFFLINE": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "OMP_WAIT_POLICY": "PASSIVE",
    # Each benchmark starts its own local Ray and stops it; token auth is for clusters.
    "RAY_AUTH_MODE": "disabled",
}
for key, value in BENCH_ENV.items():
    os.environ.setdefault(key, value)
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
