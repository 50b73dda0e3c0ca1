"""The local cluster's pure parts: the autoscaler config it writes, and whose processes it stops."""

from __future__ import annotations

import subprocess
import time

import pytest

from l2vg_ray.local_cluster import HEAD_TYPE, WorkerType, autoscaling_config, kill_processes_of


def test_the_autoscaling_config_offers_the_slots_only_on_the_worker_types():
    eval_w = WorkerType("eval-worker", {"CPU": 1, "eval_slot": 1}, min_workers=0, max_workers=3)
    serve_w = WorkerType("serve-worker", {"CPU": 2, "serve_slot": 1}, min_workers=1, max_workers=2)
    cfg = autoscaling_config(head_cpus=1, worker_types=[eval_w, serve_w],
                             gcs_address="127.0.0.1:6390", idle_timeout_s=12)
    types = cfg["available_node_types"]
    assert types[HEAD_TYPE] == {"resources": {"CPU": 1}, "node_config": {}, "max_workers": 0}
    assert cfg["head_node_type"] == HEAD_TYPE
    assert types["eval-worker"]["resources"]["eval_slot"] == 1
    assert (types["serve-worker"]["min_workers"], types["serve-worker"]["max_workers"]) == (1, 2)
    assert cfg["max_workers"] == 5
    assert cfg["idle_timeout_minutes"] == pytest.approx(0.2)
    assert cfg["provider"]["type"] == "fake_multinode"
    assert cfg["provider"]["gcs_address"] == "127.0.0.1:6390"


@pytest.mark.parametrize("kwargs", [
    {"resources": {"CPU": 1}, "min_workers": 2, "max_workers": 1},
    {"resources": {"eval_slot": 1}},
])
def test_a_worker_type_that_cannot_exist_is_refused(kwargs):
    with pytest.raises(ValueError, match="bad"):
        WorkerType("bad", **kwargs)


def test_stop_kills_only_processes_given_exactly_its_gcs_address(tmp_path):
    """A process of another cluster whose port starts with ours is left alone."""
    script = "import time; time.sleep(60)"
    other = subprocess.Popen(["python3", "-c", script, "--gcs-address=127.0.0.1:51234"])
    ours = subprocess.Popen(["python3", "-c", script, "--gcs-address=127.0.0.1:5123"])
    mine_by_dir = subprocess.Popen(["python3", "-c", script, f"--temp-dir={tmp_path}/session"])
    try:
        time.sleep(0.3)
        assert kill_processes_of([str(tmp_path)], "127.0.0.1:5123") == 2
        assert ours.wait(timeout=10) != 0 and mine_by_dir.wait(timeout=10) != 0
        assert other.poll() is None
    finally:
        for p in (other, ours, mine_by_dir):
            p.kill()
            p.wait()
