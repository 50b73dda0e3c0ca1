"""Task suites by name: ``SUITES.get(cfg.eval.suite)(cfg) -> list of task names``.

Suites return task *names* so that each Ray task builds its own task object where it runs
(``build_task``); the explicit lists live in ``l2vg_ray/resources/suites.yaml``.

- ``offline``: real data from registry packages (``tasks/offline.py``), runs with no network;
  ``offline-bigbench``: the BIG-bench tasks (their archive is no longer served); ``offline-all``
  both.
- ``mteb-lite``: the paper's 10-task MTEB subset.
- ``mteb-eng-v2``: ``mteb.get_benchmark("MTEB(eng, v2)")``; ``bright``: mteb's BRIGHT.
- ``advbench-ir``: the paper's harmful-retrieval evaluation (``tasks/advbench.py``, hub-backed).
- ``list``: the mteb task names in ``cfg.eval.tasks``.
Real mteb tasks download from the Hugging Face hub when they load (a real cluster, not here).
"""

from __future__ import annotations

from collections.abc import Callable
from functools import cache
from importlib import resources
from typing import TYPE_CHECKING, Any

import yaml

from l2vg_ray.config import ConfigError
from l2vg_ray.registry import Registry

if TYPE_CHECKING:
    from omegaconf import DictConfig

SuiteFn = Callable[["DictConfig"], list[str]]
SUITES: Registry[SuiteFn] = Registry(
    "task suite", hint="Set eval.suite to one of these (suite=list uses eval.tasks)."
)


@cache
def suite_lists() -> dict[str, Any]:
    text = resources.files("l2vg_ray").joinpath("resources", "suites.yaml").read_text()
    return yaml.safe_load(text)


def _benchmark_tasks(name: str) -> list[str]:
    import mteb

    return [t.metadata.name for t in mteb.get_benchmark(name).tasks]


@SUITES.register("offline")
def offline_suite(cfg: DictConfig) -> list[str]:
    return list(suite_lists()["offline"])


@SUITES.register("offline-bigbench")
def offline_bigbench_suite(cfg: DictConfig) -> list[str]:
    return list(suite_lists()["offline-bigbench"])


@SUITES.register("offline-all")
def offline_all_suite(cfg: DictConfig) -> list[str]:
    return [*suite_lists()["offline"], *suite_lists()["offline-bigbench"]]


@SUITES.register("mteb-lite")
def mteb_lite_suite(cfg: DictConfig) -> list[str]:
    return list(suite_lists()["mteb-lite"])


@SUITES.register("mteb-eng-v2")
def mteb_eng_v2_suite(cfg: DictConfig) -> list[str]:
    return _benchmark_tasks(suite_lists()["benchmarks"]["mteb-eng-v2"])


@SUITES.register("bright")
def bright_suite(cfg: DictConfig) -> list[str]:
    return _benchmark_tasks(suite_lists()["benchmarks"]["bright"])


@SUITES.register("advbench-ir")
def advbench_suite(cfg: DictConfig) -> list[str]:
    """The paper's safety evaluation (hub-backed; l2vg_ray/eval/tasks/advbench.py)."""
    from l2vg_ray.eval.tasks.advbench import TASK_NAME

    return [TASK_NAME]


@SUITES.register("list")
def list_suite(cfg: DictConfig) -> list[str]:
    names = [str(t) for t in cfg.eval.tasks]
    if not names:
        raise ConfigError(
            "eval.suite=list needs task names in eval.tasks, e.g. "
            "'eval.tasks=[STSBenchmark,Banking77Classification]'."
        )
    return names


def suite_task_names(cfg: DictConfig) -> list[str]:
    """The task names of ``cfg.eval.suite``, deduplicated in order; unknown mteb names fail early."""
    names = list(dict.fromkeys(SUITES.get(str(cfg.eval.suite))(cfg)))
    from l2vg_ray.eval.tasks.advbench import TASK_NAME as ADVBENCH
    from l2vg_ray.eval.tasks.offline import OFFLINE_TASKS

    mteb_names = [n for n in names if n not in OFFLINE_TASKS and n != ADVBENCH]
    if mteb_names:
        import mteb

        try:
            mteb.get_tasks(tasks=mteb_names)
        except KeyError as e:
            raise ConfigError(f"Unknown mteb task in suite {cfg.eval.suite!r}: {e}.") from None
    return names


def build_task(name: str, *, data_dir: str | None, max_docs: int, seed: int):
    """An mteb task object: an offline task (needs ``data_dir``) or a task from mteb's registry."""
    from l2vg_ray.eval.tasks.offline import OFFLINE_TASKS, build_offline_task

    if name in OFFLINE_TASKS:
        if data_dir is None:
            raise ValueError(f"Offline task {name!r} needs the prepared data folder (data_dir).")
        return build_offline_task(name, data_dir=data_dir, max_docs=max_docs, seed=seed)
    import mteb

    return mteb.get_task(name)
