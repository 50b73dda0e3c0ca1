"""The local cluster's log quieting targets loggers that exist in the installed Ray."""

from __future__ import annotations

import importlib
import logging

from l2vg_ray.ray_utils import QUIET_LOGGERS, quiet_ray_logs

CONTEXT = "ray.train.v2._internal.execution.context"


def test_quiet_ray_logs_raises_the_level_of_loggers_that_exist():
    modules = {name: importlib.import_module(name) for name in (*QUIET_LOGGERS, CONTEXT)}
    loggers = {name: m.logger for name, m in modules.items()}
    # The names the hook sets must be the names these modules log under (the context module
    # names its logger by its file path, which the hook computes).
    for name in QUIET_LOGGERS:
        assert loggers[name].name == name, name
    before = {name: lg.level for name, lg in loggers.items()}
    try:
        quiet_ray_logs()
        for name, level in QUIET_LOGGERS.items():
            assert not loggers[name].isEnabledFor(level - 10) and loggers[name].isEnabledFor(level)
        assert not loggers[CONTEXT].isEnabledFor(logging.INFO)
        assert loggers[CONTEXT].isEnabledFor(logging.WARNING)
    finally:
        for name, lg in loggers.items():
            lg.setLevel(before[name])


def test_progress_line_logs_at_most_every_interval_with_rate_and_eta(caplog, monkeypatch):
    from l2vg_ray import ray_utils

    clock = iter([0.0, 10.0, 40.0, 50.0, 80.0]).__next__
    monkeypatch.setattr(ray_utils.time, "monotonic", clock)
    p = ray_utils.ProgressLine("generate", 100, every_s=30, done=20)  # started at 0 s
    with caplog.at_level(logging.INFO, logger=ray_utils.log.name):
        p.update(10)  # 10 s: not yet due
        p.update(20)  # 40 s: due -> 50/100, 30 new rows in 40 s
        p.update(10)  # 50 s: not due again so soon
        p.update(40)  # 80 s: all done, the stage's summary says the rest
    lines = [r.getMessage() for r in caplog.records]
    assert lines == ["generate: 50/100 rows (50%), 0.75 rows/s, ETA 1m06s"]


def test_ray_data_progress_blocks_are_turned_off():
    from ray.data import DataContext

    from l2vg_ray.ray_utils import quiet_ray_data_progress

    ctx = DataContext.get_current()
    before = (ctx.enable_progress_bars, ctx.enable_operator_progress_bars)
    try:
        quiet_ray_data_progress()
        assert not ctx.enable_progress_bars and not ctx.enable_operator_progress_bars
    finally:
        ctx.enable_progress_bars, ctx.enable_operator_progress_bars = before


def test_init_ray_turns_the_train_preemption_watcher_off_unless_asked(monkeypatch):
    """Ray Train's watcher logs an error line per run; off by default, on via cluster.env_vars."""
    import os

    import ray

    from l2vg_ray.config import load_config
    from l2vg_ray.ray_utils import TRAIN_ENV, init_ray

    key = next(iter(TRAIN_ENV))
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", lambda *a, **k: None)
    for env_vars, expected in (({}, "0"), ({key: "1"}, "1")):
        monkeypatch.delenv(key, raising=False)
        cfg = load_config(None, [f"cluster.env_vars={env_vars}".replace("'", "")])
        init_ray(cfg.cluster)
        assert os.environ[key] == expected
