"""``run_train`` rejects bad configs before any worker (or Ray at all) starts."""

from __future__ import annotations

import pytest

from l2vg_ray.config import ConfigError
from l2vg_ray.testing import write_fixture_dataset
from l2vg_ray.train.trainer import run_train


@pytest.fixture
def cfg(tiny_config, tmp_path):
    tiny_config.train.data_dir = str(write_fixture_dataset(tmp_path / "data", n_rows=8, teacher_dim=32))
    return tiny_config


def test_missing_dataset(cfg, tmp_path):
    cfg.train.data_dir = str(tmp_path / "missing")
    with pytest.raises(ConfigError, match=r"train.data_dir=.*missing' does not exist.*l2vg generate"):
        run_train(cfg)


def test_teacher_dim_mismatch(cfg):
    cfg.model.teacher_dim = 384
    with pytest.raises(ConfigError, match=r"model.teacher_dim=384 but .* have 32 dims"):
        run_train(cfg)


def test_batch_not_divisible_by_workers_times_accumulation(cfg):
    cfg.train.num_workers = 3
    with pytest.raises(ConfigError, match=r"train.batch_size=4 is not divisible by .* 3 x 1 = 3"):
        run_train(cfg)


def test_too_few_rows_for_one_batch(cfg):
    cfg.train.batch_size = 32
    with pytest.raises(ConfigError, match="8 rows: too few"):
        run_train(cfg)


def test_resume_without_a_previous_run(cfg):
    with pytest.raises(ConfigError, match="no run with a checkpoint exists"):
        run_train(cfg, resume=True)
