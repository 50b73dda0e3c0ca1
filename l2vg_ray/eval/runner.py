"""``run_eval(cfg)``: an encoder (trained folder or baseline) on a task suite, one Ray task per task.

    suite -> task names -> (offline data prepared once, here) -> fan_out(evaluate_task) -> table

``evaluate_task(job)`` is the pure per-task core (no Ray): load the encoder (memoised per process,
behind the embedding cache), build the task, ``mteb.evaluate`` it with a ``ResultCache`` in
``<eval.output_dir>/mteb`` (``overwrite=false`` = mteb's only-missing: finished tasks are read
back, not recomputed) and return one row of the results table.
"""

from __future__ import annotations

import json
import logging
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from l2vg_ray.config import L2VGConfig, typed
from l2vg_ray.torch_utils import cpu_threads
from l2vg_ray.tracking import check_tracking, log_evaluation, tracked

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TaskJob:
    """Everything one Ray task needs (plain, picklable)."""

    task: str
    model: str  # trained encoder folder or baseline name
    cfg: L2VGConfig  # the typed config (to build baselines / load the encoder)
    data_dir: str | None  # prepared offline data (offline tasks only)
    results_dir: str  # mteb ResultCache folder
    cache_dir: str | None  # embedding cache folder; None = no cache
    overwrite: bool
    batch_size: int
    max_docs: int
    seed: int
    num_threads: int
    instructions: str = "project"  # named instruction set (InstructionSet.named)
    max_length: int | None = None  # input tokens per text (eval.max_length); None = the model's


_ENCODERS: dict[str, Any] = {}


def _encoder(job: TaskJob):
    """The (cached) encoder for this job, loaded once per worker process and reused."""
    from l2vg_ray.eval import baselines  # noqa: F401  (registers into BASELINES)
    from l2vg_ray.eval.cache import CachedEncoder, EmbeddingCache
    from l2vg_ray.loading import load_encoder, saved_encoder_folder

    c = job.cfg
    key = json.dumps([job.model, job.cache_dir, asdict(c.model), asdict(c.generate), c.cache_dir,
                      job.max_length], sort_keys=True, default=str)
    if key not in _ENCODERS:
        _ENCODERS.clear()  # one encoder per process: free the previous one's memory
        saved = saved_encoder_folder(job.model, c) if job.cache_dir else None
        if saved is not None:
            # A trained encoder's fingerprint comes from its small files: the LLM loads only
            # when the cache misses a text, so a fully cached task never loads it.
            from l2vg_ray.encoder.model import saved_encoder_info

            def load():  # the folder, already resolved from a packaged name
                return load_encoder(str(saved), c, max_length=job.max_length)

            info = saved_encoder_info(saved, max_length=job.max_length)
            encoder = CachedEncoder.deferred(load, EmbeddingCache(job.cache_dir), name=info.name,
                                             dim=info.dim, fingerprint=info.fingerprint)
        else:
            encoder = load_encoder(job.model, c, max_length=job.max_length)
            if job.cache_dir:
                encoder = CachedEncoder(encoder, EmbeddingCache(job.cache_dir))
        _ENCODERS[key] = encoder
    return _ENCODERS[key]


def evaluate_task(job: TaskJob) -> dict[str, Any]:
    """Run one task; returns its results-table row. Raises on failure (the fan-out reports it)."""
    import mteb
    import torch

    from l2vg_ray.eval.adapter import InstructionSet, MTEBEncoder
    from l2vg_ray.eval.suites import build_task
    from l2vg_ray.eval.tasks import advbench

    torch.set_num_threads(max(1, job.num_threads))
    # mteb's classifiers on a weak (e.g. smoke-trained) encoder predict some labels never;
    # sklearn then warns once per fold and label set, dozens of lines that need no action.
    from sklearn.exceptions import UndefinedMetricWarning

    warnings.filterwarnings("ignore", category=UndefinedMetricWarning)
    t0 = time.perf_counter()
    if job.task == advbench.TASK_NAME:
        return _evaluate_advbench(job, t0)
    encoder = _encoder(job)
    hits0, misses0 = getattr(encoder, "hits", 0), getattr(encoder, "misses", 0)
    task = build_task(job.task, data_dir=job.data_dir, max_docs=job.max_docs, seed=job.seed)
    model = MTEBEncoder(encoder, instructions=InstructionSet.named(job.instructions),
                        batch_size=job.batch_size, spec=job.model)
    result = mteb.evaluate(
        model,
        task,
        cache=mteb.ResultCache(cache_path=job.results_dir),
        overwrite_strategy="always" if job.overwrite else "only-missing",
        encode_kwargs={"batch_size": job.batch_size},
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
        "fingerprint": encoder.fingerprint(),
        "scores": task_result.scores,
        "error": None,
        "instructions": job.instructions,
    }


def _evaluate_advbench(job: TaskJob, t0: float, data: Any = None) -> dict[str, Any]:
    """AdvBench-IR (not an mteb task: its own metric), with an only-missing result file."""
    from l2vg_ray.eval.adapter import InstructionSet
    from l2vg_ray.eval.tasks import advbench

    encoder = _encoder(job)
    result_file = (Path(job.results_dir) / model_slug(job.model)
                   / f"{advbench.TASK_NAME}-{job.instructions}-{encoder.fingerprint()}.json")
    if result_file.is_file() and not job.overwrite:
        scores = json.loads(result_file.read_text())
    else:
        data = data if data is not None else advbench.load_hub()
        scores = advbench.evaluate(encoder, InstructionSet.named(job.instructions), data,
                                   batch_size=job.batch_size)
        result_file.parent.mkdir(parents=True, exist_ok=True)
        result_file.write_text(json.dumps(scores, indent=2))
    return {
        "task": advbench.TASK_NAME, "type": advbench.TASK_TYPE, "status": "ok",
        "main_score": float(scores[advbench.MAIN_SCORE]), "metric": advbench.MAIN_SCORE,
        "seconds": round(time.perf_counter() - t0, 2), "n_encoded": None, "n_cached": None,
        "encoder": encoder.name, "fingerprint": encoder.fingerprint(), "scores": scores,
        "error": None, "instructions": job.instructions,
    }


def make_jobs(cfg: DictConfig, task_names: list[str], *, data_dir: str | None) -> list[TaskJob]:
    e = cfg.eval
    c = typed(cfg)
    return [
        TaskJob(
            task=name,
            model=str(e.model),
            cfg=c,
            data_dir=data_dir,
            results_dir=str(Path(e.output_dir) / "mteb"),
            cache_dir=str(e.cache_dir) if e.cache_dir else None,
            overwrite=bool(e.overwrite),
            batch_size=int(e.batch_size),
            max_docs=int(e.max_docs),
            seed=int(e.seed),
            num_threads=cpu_threads(e.num_cpus_per_task),
            instructions=str(e.instructions),
            max_length=int(e.max_length) if e.max_length is not None else None,
        )
        for name in task_names
    ]


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


def model_slug(model: str) -> str:
    from l2vg_ray.eval.adapter import mteb_model_name

    return mteb_model_name(model).split("/", 1)[1]


def run_eval(cfg: DictConfig) -> dict[str, Any]:
    """Evaluate ``cfg.eval.model`` on ``cfg.eval.suite``; prints one table, writes the report."""
    from l2vg_ray.eval.adapter import InstructionSet
    from l2vg_ray.eval.fanout import fan_out
    from l2vg_ray.eval.report import markdown_table, summarize, write_report
    from l2vg_ray.eval.suites import suite_task_names
    from l2vg_ray.eval.tasks.data import prepare_offline_data
    from l2vg_ray.eval.tasks.offline import OFFLINE_TASKS

    e = cfg.eval
    InstructionSet.named(str(e.instructions))  # an unknown name fails here, not in every task
    check_tracking(e.tracking)
    names = suite_task_names(cfg)
    data_dir = None
    if any(n in OFFLINE_TASKS for n in names):
        # Once, in the driver: the Ray tasks then only read Parquet files.
        data_dir = str(prepare_offline_data(cfg.cache_dir))
    jobs = make_jobs(cfg, names, data_dir=data_dir)
    log.info("Evaluating %s on %d tasks of suite %r (%d at a time)", e.model, len(jobs), e.suite,
             e.max_concurrency)
    t0 = time.perf_counter()
    outcomes = fan_out(
        evaluate_task,
        jobs,
        keys=names,
        num_cpus=float(e.num_cpus_per_task),
        num_gpus=float(e.num_gpus_per_task),
        max_concurrency=int(e.max_concurrency),
        max_retries=int(e.max_retries),
        on_done=lambda o: log.info("%s %s (%.1fs)", o.key, "done" if o.ok else "FAILED", o.seconds),
    )
    wall = time.perf_counter() - t0
    rows = []
    for o in outcomes:
        if o.ok:
            rows.append(o.value)
        else:
            rows.append({"task": o.key, "type": _task_type(o.key), "status": "failed",
                         "main_score": None, "metric": None, "seconds": round(o.seconds, 2),
                         "n_encoded": None, "n_cached": None, "error": o.error})
    out_dir = Path(e.output_dir) / model_slug(str(e.model))
    meta = {"model": str(e.model), "suite": str(e.suite), "wall_seconds": round(wall, 2),
            "max_docs": int(e.max_docs), "seed": int(e.seed), "instructions": str(e.instructions),
            "max_length": e.max_length}
    files = write_report(rows, out_dir, meta=meta)
    print(markdown_table(rows, title=f"{e.model} on {e.suite} ({wall:.0f}s)"), flush=True)
    summary = summarize(rows)
    result = {
        **meta,
        **summary,
        "scores": {r["task"]: r["main_score"] for r in rows},
        "failed": {r["task"]: r["error"] for r in rows if r["status"] == "failed"},
        "files": files,
    }
    with tracked(cfg, "eval") as tracker:
        if tracker is not None:
            log_evaluation(tracker, cfg, result)
            result["tracking"] = {"kind": str(e.tracking.kind), "run_id": tracker.run_id}
    return result
