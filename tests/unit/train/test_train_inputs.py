"""What the driver hands the Ray Train workers (trainer.worker_config): config, numbers and
paths, never rows, so the controller actor's constructor arguments stay far below Ray's 100 KB
object-store threshold however many held-out and probe rows a run has. No Ray."""

from __future__ import annotations

import pickle

import numpy as np
import pytest

from l2vg_ray.dataset import inspect_dataset
from l2vg_ray.testing import write_fixture_dataset
from l2vg_ray.train import data as train_data
from l2vg_ray.train import trainer
from l2vg_ray.train.batching import plan_batches
from l2vg_ray.train.loop import WORKER_KEY

RAY_INLINE_LIMIT = 100 * 1024  # Ray puts larger task / actor arguments in the object store


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """2000 rows: 200 held out, 1800 probe rows (the default train.probe_rows is 2000)."""
    path = write_fixture_dataset(tmp_path_factory.mktemp("d"), n_rows=2000, teacher_dim=32)
    return train_data.read_training_data(
        inspect_dataset(str(path)), val_rows=256, max_rows=None, probe_rows=2000, seed=0
    )


def test_worker_config_carries_paths_not_rows(tiny_config, data, tmp_path):
    assert len(pickle.dumps(data.probe)) > RAY_INLINE_LIMIT  # what used to travel in the config
    inputs = str(tmp_path / "run" / trainer.INPUTS_DIR)
    worker = trainer.worker_config(
        tiny_config, data, plan=plan_batches(4, 2, 1), teacher_dim=32, inputs_dir=inputs
    )
    assert len(pickle.dumps({WORKER_KEY: worker})) < RAY_INLINE_LIMIT / 10
    assert worker.total_steps == tiny_config.train.max_steps and worker.fault is None
    for path, rows in ((worker.heldout_file, data.heldout), (worker.probe_file, data.probe)):
        assert path is not None and path.startswith(inputs)
        back = train_data.read_rows(path)
        assert back.queries == rows.queries and back.responses == rows.responses
        np.testing.assert_array_equal(back.teacher, rows.teacher)
        assert back.teacher.dtype == np.float32


def test_no_heldout_or_probe_rows_means_no_files(tiny_config, tmp_path):
    path = write_fixture_dataset(tmp_path / "d", n_rows=24, teacher_dim=32)
    empty = train_data.read_training_data(
        inspect_dataset(str(path)), val_rows=0, max_rows=None, probe_rows=0, seed=0
    )
    worker = trainer.worker_config(
        tiny_config, empty, plan=plan_batches(4, 2, 1), teacher_dim=32,
        inputs_dir=str(tmp_path / "inputs"),
    )
    assert worker.heldout_file is None and worker.probe_file is None
    assert not (tmp_path / "inputs").exists()
