"""Test-only fault injection: a Ray Train worker that SIGKILLs itself once, mid-run.

The restart tests (``tests/ray/test_train.py``) set ``L2VG_TRAIN_FAULT`` to JSON
``{"step": k, "rank": r, "marker": path}`` on the driver; ``run_train`` reads it into a ``Fault``
that travels in the workers' config, and worker ``r`` kills itself after optimiser step ``k``
unless ``marker`` exists (it creates it first), i.e. once per marker. Unset, nothing happens.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import time
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

FAULT_ENV = "L2VG_TRAIN_FAULT"


@dataclass(frozen=True)
class Fault:
    """Kill worker ``rank`` after optimiser step ``step``, once: ``marker`` records that it did."""

    step: int
    rank: int
    marker: str


def fault_from_env() -> Fault | None:
    """The fault ``FAULT_ENV`` asks for, or None when it is unset or empty."""
    raw = os.environ.get(FAULT_ENV)
    if not raw:
        return None
    f = json.loads(raw)
    return Fault(step=int(f["step"]), rank=int(f.get("rank", 0)), marker=str(f["marker"]))


def maybe_fail(fault: Fault | None, *, step: int, rank: int, last_checkpoint: str | None) -> None:
    """SIGKILL this worker (no cleanup, like a crash) if ``fault`` is due at ``step`` on ``rank``.

    It first waits until Ray Train has recorded ``last_checkpoint`` in the run's snapshot, so the
    test knows which checkpoint the restart must come from (a real crash right after a report
    may also lose that report and restart from the checkpoint before).
    """
    if fault is None or fault.step != step or fault.rank != rank:
        return
    marker = Path(fault.marker)
    if marker.exists():  # already failed once: the restarted run goes on
        return
    if last_checkpoint is not None:
        _wait_for_snapshot(last_checkpoint)
    marker.parent.mkdir(parents=True, exist_ok=True)
    marker.write_text(f"killed rank {rank} at step {step}\n")
    log.warning("Fault injection: SIGKILL to worker rank %d at step %d", rank, step)
    os.kill(os.getpid(), signal.SIGKILL)


def _wait_for_snapshot(checkpoint_name: str, timeout_s: float = 120.0) -> None:
    """Poll Ray Train's checkpoint snapshot of this run until it names ``checkpoint_name``."""
    import ray.train

    from l2vg_ray.train.state import SNAPSHOT_FILE

    storage = ray.train.get_context().get_storage()
    snapshot = f"{storage.experiment_fs_path}/{SNAPSHOT_FILE}"
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            with storage.storage_filesystem.open_input_stream(snapshot) as f:
                if checkpoint_name in f.read().decode():
                    return
        except FileNotFoundError:
            pass
        time.sleep(0.2)
