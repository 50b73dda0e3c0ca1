"""``run_train(cfg)``: validate, then fit a Ray Train ``TorchTrainer`` and export the encoder.

Everything that can be checked without a worker is checked first (batch arithmetic, scheduler
name, the data folder, its teacher dimension), so a bad config fails in a second with a message
naming the value and the fix instead of after the workers have loaded the LLM.

Runs live under ``cluster.storage_path`` (default ``<train.output_dir>/ray_results``) as
``train-<timestamp>-<id>``; ``run_train(cfg, resume=True)`` (``l2vg train --resume``) reuses the latest run
that holds a checkpoint, which Ray Train V2 restores (``ray.train.get_checkpoint()`` in the loop).
Worker deaths within a run are retried ``train.max_failures`` times from the latest checkpoint.

The workers' inputs come from ONE read of the training data (``prepare_inputs``): the training
rows go to the object store as a Ray Dataset, the held-out and probe rows to Parquet files in the
run's folder (``worker_inputs/``), and the workers' config (``loop.WorkerConfig``) holds only
config, numbers and those paths.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
import uuid
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from omegaconf import DictConfig

if TYPE_CHECKING:
    import ray.train
    from ray.train.torch import TorchTrainer

from l2vg_ray.config import ConfigError, L2VGConfig, typed
from l2vg_ray.dataset import DatasetInfo, inspect_dataset
from l2vg_ray.storage import absolute as storage_absolute
from l2vg_ray.storage import filesystem as storage_fs
from l2vg_ray.storage import join as storage_join
from l2vg_ray.tracking import log_training, tracked
from l2vg_ray.train import data as train_data
from l2vg_ray.train import state as ckpt
from l2vg_ray.train.batching import BatchPlan, plan_batches, total_steps
from l2vg_ray.train.faults import fault_from_env
from l2vg_ray.train.loop import WORKER_KEY, WorkerConfig, train_loop_per_worker
from l2vg_ray.train.metrics import plot_curves, write_metrics_csv
from l2vg_ray.train.state import SNAPSHOT_FILE

log = logging.getLogger(__name__)

RUN_PREFIX = "train-"
FINAL_DIR = "final"
METRICS_FILE = "metrics.csv"
CURVES_FILE = "curves.png"
SUMMARY_FILE = "train_summary.json"
# The held-out and probe rows the workers read, in the run's folder under the storage path.
INPUTS_DIR = "worker_inputs"
HELDOUT_FILE = "heldout.parquet"
PROBE_FILE = "probe.parquet"


def storage_path(cfg: DictConfig) -> str:
    """Where Ray Train keeps runs and checkpoints (a URI, or an absolute local path)."""
    return storage_absolute(
        cfg.cluster.storage_path or storage_join(str(cfg.train.output_dir), "ray_results")
    )


def latest_run_name(storage: str) -> str | None:
    """The newest ``train-*`` run under ``storage`` that holds a checkpoint snapshot."""
    import pyarrow.fs as pafs

    fs, root = storage_fs(storage)
    if fs.get_file_info(root).type != pafs.FileType.Directory:
        return None
    runs = sorted(
        (info.base_name for info in fs.get_file_info(pafs.FileSelector(root))
         if info.type == pafs.FileType.Directory and info.base_name.startswith(RUN_PREFIX)),
        reverse=True,
    )
    for name in runs:
        if fs.get_file_info(f"{root}/{name}/{SNAPSHOT_FILE}").type == pafs.FileType.File:
            return name
    return None


def new_run_name() -> str:
    # Sorts by time, so the newest run is the lexicographically largest name.
    return f"{RUN_PREFIX}{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}"


def run_train(cfg: L2VGConfig, *, resume: bool = False) -> dict:
    """Train the encoder on ``train.data_dir``; write ``final/``, curves and a summary. With
    ``resume`` (``l2vg train --resume``; the pipeline after an interruption) the latest run under
    the storage path continues from its checkpoint."""
    cfg = typed(cfg)  # a DictConfig from load_config is accepted (checked there)
    t = cfg.train
    plan = plan_batches(t.batch_size, t.num_workers, t.grad_accum_steps)
    info = inspect_dataset(str(t.data_dir))
    teacher_dim = train_data.check_data_against_config(
        info, teacher_dim=cfg.model.teacher_dim, plan=plan
    )
    storage = storage_path(cfg)
    name = run_name(storage, resume=resume)
    inputs = prepare_inputs(
        cfg, info, plan=plan, teacher_dim=teacher_dim,
        inputs_dir=storage_join(storage, name, INPUTS_DIR),
    )
    trainer = build_trainer(cfg, inputs, name=name, storage=storage)
    log.info(
        "Training %d steps: global batch %d = %d rows x %d workers x %d accumulation; %d "
        "training rows of %d", inputs.worker.total_steps, plan.global_batch, plan.micro_batch,
        plan.num_workers, plan.grad_accum_steps, inputs.train_rows, info.num_rows,
    )
    start = time.perf_counter()
    result: ray.train.Result = trainer.fit()
    elapsed = time.perf_counter() - start
    if result.checkpoint is None:
        raise RuntimeError(f"Run {name!r} finished without a checkpoint under {storage!r}.")
    summary = export_run(cfg, result.checkpoint, run_name=name, storage=storage,
                         elapsed_s=elapsed, extra={"rows": info.num_rows, "teacher_dim": teacher_dim,
                                                   "micro_batch": plan.micro_batch})
    with tracked(cfg, "train") as tracker:
        if tracker is not None:
            log_training(tracker, cfg, summary)
            summary["tracking"] = {"kind": str(t.tracking.kind), "run_id": tracker.run_id}
            summary_file = Path(str(t.output_dir)) / SUMMARY_FILE
            summary_file.write_text(json.dumps(summary, indent=2))
    return summary


def run_name(storage: str, *, resume: bool) -> str:
    """A new run's name, or with ``resume`` the newest run under ``storage`` with a checkpoint."""
    if not resume:
        return new_run_name()
    name = latest_run_name(storage)
    if name is None:
        raise ConfigError(
            f"--resume: no run with a checkpoint exists under {storage!r}. "
            f"Train without --resume first (or set cluster.storage_path to the old runs)."
        )
    log.info("Resuming run %s from its latest checkpoint", name)
    return name


@dataclass(frozen=True)
class WorkerInputs:
    """What the ``TorchTrainer`` gets: the workers' config and the training rows."""

    worker: WorkerConfig
    dataset: Any  # ray.data.MaterializedDataset of the training rows
    train_rows: int


def prepare_inputs(
    cfg: DictConfig, info: DatasetInfo, *, plan: BatchPlan, teacher_dim: int, inputs_dir: str
) -> WorkerInputs:
    """Read the training data ONCE and derive every input of the workers from that table: the
    split, the targets' moments, the step count, the held-out and probe rows (files under
    ``inputs_dir``) and the training rows (in the object store)."""
    t = cfg.train
    data = train_data.read_training_data(
        info, val_rows=int(t.val_rows), max_rows=t.max_rows, seed=int(t.seed),
        probe_rows=max(int(t.probe_rows), int(t.calibration_rows)),
    )
    worker = worker_config(cfg, data, plan=plan, teacher_dim=teacher_dim, inputs_dir=inputs_dir)
    return WorkerInputs(worker, train_data.train_dataset(data.tables), data.num_rows)


def worker_config(
    cfg: DictConfig, data: train_data.TrainingData, *, plan: BatchPlan, teacher_dim: int,
    inputs_dir: str,
) -> WorkerConfig:
    """The workers' config: typed sections, numbers and paths, no rows (see ``WorkerConfig``).
    The held-out and probe rows are written as Parquet under ``inputs_dir``, shared storage
    every worker reads; a rerun of the same run (``--resume``) writes the same files."""
    t, stats = cfg.train, data.stats
    log.info(
        "Targets: %d training rows, %d held out; mean-vector MSE %.5f, zero-vector MSE %.5f",
        data.num_rows, len(data.heldout), stats.mean_vector_mse, stats.zero_vector_mse,
    )
    files = {
        key: train_data.write_rows(rows, storage_join(inputs_dir, file)) if len(rows) else None
        for key, rows, file in (("heldout_file", data.heldout, HELDOUT_FILE),
                                ("probe_file", data.probe, PROBE_FILE))
    }
    c = typed(cfg)
    return WorkerConfig(
        model=c.model,
        train=c.train,
        cache_dir=c.cache_dir,
        plan=plan,
        total_steps=total_steps(t.max_steps, t.epochs, data.num_rows, plan),
        teacher_dim=teacher_dim,
        target_stats=stats,
        fault=fault_from_env(),
        **files,
    )


def build_trainer(
    cfg: DictConfig, inputs: WorkerInputs, *, name: str, storage: str
) -> TorchTrainer:
    """The ``TorchTrainer`` of run ``name``: workers and their resources, checkpoints, retries."""
    from ray.train import (
        CheckpointConfig,
        DataConfig,
        FailureConfig,
        LoggingConfig,
        RunConfig,
        ScalingConfig,
    )
    from ray.train.torch import TorchTrainer

    t = cfg.train
    resources = {"CPU": float(t.cpus_per_worker)}
    if t.use_gpu:
        resources["GPU"] = float(t.gpus_per_worker or 1.0)
    with warnings.catch_warnings():  # Ray's own use of a deprecated field, nothing to act on
        warnings.filterwarnings("ignore", message=".*exclude_resources.*")
        ingest = DataConfig.default_ingest_options()
    ingest.preserve_order = True  # the same rows reach the same worker on every (re)start
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config={WORKER_KEY: inputs.worker},
        scaling_config=ScalingConfig(
            num_workers=t.num_workers, use_gpu=bool(t.use_gpu), resources_per_worker=resources
        ),
        run_config=RunConfig(
            name=name,
            storage_path=storage,
            checkpoint_config=CheckpointConfig(num_to_keep=t.num_to_keep),
            failure_config=FailureConfig(max_failures=t.max_failures),
            # Ray Train's own INFO lines (worker-group start-up, "Checkpoint successfully
            # created") only in its log files; our loop logs progress and validation itself.
            logging_config=LoggingConfig(log_level="WARNING"),
        ),
        datasets={"train": inputs.dataset},
        dataset_config=DataConfig(execution_options=ingest),
    )


def export_run(
    cfg: DictConfig,
    checkpoint: ray.train.Checkpoint,
    *,
    run_name: str,
    storage: str,
    elapsed_s: float,
    extra: dict[str, Any],
) -> dict:
    """Copy the latest checkpoint's encoder to ``<train.output_dir>/final``; write the curves."""
    out = Path(str(cfg.train.output_dir))
    out.mkdir(parents=True, exist_ok=True)
    final = out / FINAL_DIR
    with checkpoint.as_directory() as d:
        train_state = ckpt.read_train_state(d)["state"]
        history = train_state.history
        staging = out / f".{FINAL_DIR}.tmp-{uuid.uuid4().hex[:6]}"
        shutil.copytree(Path(d) / ckpt.ENCODER_DIR, staging)
    if final.exists():
        shutil.rmtree(final)
    staging.rename(final)
    metrics_csv = write_metrics_csv(history, out / METRICS_FILE)
    curves = plot_curves(history, out / CURVES_FILE, title=f"{cfg.name}: {run_name}",
                         references=train_state.references)
    t = cfg.train
    steps_done = [r for r in history if "loss" in r]
    summary = {
        "run_name": run_name,
        "storage_path": storage,
        "checkpoint": checkpoint.path,
        "final_dir": str(final),
        "metrics_csv": str(metrics_csv),
        "curves_png": str(curves),
        "steps": int(history[-1]["step"]) if history else 0,
        "first_loss": steps_done[0]["loss"] if steps_done else None,
        "final_loss": steps_done[-1]["loss"] if steps_done else None,
        "references": train_state.references,
        "validation": [{k: v for k, v in r.items() if k == "step" or k.startswith("val_")}
                       for r in history if "val_align_mse" in r],
        "resumed_at_steps": train_state.resumes,
        "num_workers": t.num_workers,
        "global_batch": t.batch_size,
        "grad_accum_steps": t.grad_accum_steps,
        "fit_time_s": round(elapsed_s, 2),
        **extra,
    }
    (out / SUMMARY_FILE).write_text(json.dumps(summary, indent=2))
    return summary
