"""The local cluster's log quieting targets loggers that exist in the installed Ray."""

from __future__ import annotations

import importlib
import logging

from l2vg_ray.ray_utils import quiet_ray_train_logs

CLEANER = "ray.train.v2._internal.execution.controller.placement_group_cleaner"
CONTEXT = "ray.train.v2._internal.execution.context"


def test_quiet_ray_train_logs_raises_the_level_of_the_two_noisy_loggers():
    cleaner = importlib.import_module(CLEANER)
    context = importlib.import_module(CONTEXT)
    # The names the hook sets must be the names these modules log under.
    assert cleaner.logger.name == CLEANER
    before = (cleaner.logger.level, context.logger.level)
    try:
        quiet_ray_train_logs()
        assert not context.logger.isEnabledFor(logging.INFO)
        assert not cleaner.logger.isEnabledFor(logging.WARNING)
        assert context.logger.isEnabledFor(logging.WARNING)
    finally:
        cleaner.logger.setLevel(before[0])
        context.logger.setLevel(before[1])
