"""``run_train(cfg)``: validate, then fit a Ray Train ``TorchTrainer`` and export the encoder.

Everything that can be checked without a worker is checked first (batch arithmetic, scheduler
name, the data folder, its teacher dimension), so a bad config fails in a second with a message
naming the value and the fix instead of after the workers have loaded the LLM.

Runs live under ``cluster.storage_path`` (default ``<train.output_dir>/ray_results``) as
``train-<timestamp>-<id>``; ``train.resume=true`` (``l2vg train --resume``) reuses the latest run
that holds a checkpoint, which Ray Train V2 restores (``ray.train.get_checkpoint()`` in the loop).
Worker deaths within a run are retried ``train.max_failures`` times from the latest checkpoint.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
import uuid
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from omegaconf import DictConfig

if TYPE_CHECKING:
    import ray.train

from l2vg_ray.config import ConfigError, typed, validate
from l2vg_ray.dataset import inspect_dataset
from l2vg_ray.method.losses import ALIGNMENT_LOSSES, TargetStats
from l2vg_ray.storage import absolute as storage_absolute
from l2vg_ray.storage import filesystem as storage_fs
from l2vg_ray.storage import join as storage_join
from l2vg_ray.tracking import check_tracking, log_training, tracked
from l2vg_ray.train import data as train_data
from l2vg_ray.train import state as ckpt
from l2vg_ray.train.batching import plan_batches, total_steps
from l2vg_ray.train.loop import WORKER_KEY, WorkerConfig, train_loop_per_worker
from l2vg_ray.train.metrics import plot_curves, write_metrics_csv
from l2vg_ray.train.schedule import SCHEDULERS
from l2vg_ray.train.state import SNAPSHOT_FILE

log = logging.getLogger(__name__)

# Test-only: JSON {"step": k, "rank": r, "marker": path}. Worker ``r`` SIGKILLs itself after
# optimiser step ``k`` unless ``marker`` exists (it creates it first), i.e. once per marker.
FAULT_ENV = "L2VG_TRAIN_FAULT"
RUN_PREFIX = "train-"
PRECISIONS = ("auto", "bf16", "fp32")
HEAD_INITS = ("default", "calibrated")
FINAL_DIR = "final"
METRICS_FILE = "metrics.csv"
CURVES_FILE = "curves.png"
SUMMARY_FILE = "train_summary.json"


def check_train_config(cfg: DictConfig) -> None:
    """Config-only checks of the train section (no data, no Ray)."""
    validate(cfg)
    t = cfg.train
    if t.scheduler not in SCHEDULERS:
        raise ConfigError(f"train.scheduler={t.scheduler!r} is unknown; use one of {list(SCHEDULERS)}.")
    if t.precision not in PRECISIONS:
        raise ConfigError(f"train.precision={t.precision!r} is unknown; use one of {list(PRECISIONS)}.")
    ALIGNMENT_LOSSES.get(str(t.align_loss))  # an unknown name lists the known ones
    if t.head_init not in HEAD_INITS:
        raise ConfigError(f"train.head_init={t.head_init!r} is unknown; use one of {list(HEAD_INITS)}.")
    if t.head_init == "calibrated" and t.calibration_rows < 1:
        raise ConfigError(
            f"train.head_init=calibrated needs train.calibration_rows >= 1, got {t.calibration_rows}."
        )
    if t.report_every_s < 0:
        raise ConfigError(f"train.report_every_s must be >= 0 (0 = every step), got {t.report_every_s}.")
    if t.val_rows < 0 or t.probe_rows < 0:
        raise ConfigError(
            f"train.val_rows={t.val_rows} and train.probe_rows={t.probe_rows} must be >= 0 "
            f"(0 turns validation / the ridge probe off)."
        )
    for key in ("checkpoint_every", "log_every", "num_to_keep", "eval_every"):
        if t[key] < 1:
            raise ConfigError(f"train.{key} must be >= 1, got {t[key]}.")
    if t.shuffle_buffer < 0 or t.max_failures < -1:
        raise ConfigError(
            f"train.shuffle_buffer={t.shuffle_buffer} must be >= 0 and train.max_failures="
            f"{t.max_failures} >= -1 (-1 = retry forever)."
        )
    if t.epochs is not None and t.epochs < 1:
        raise ConfigError(f"train.epochs must be >= 1 or null, got {t.epochs}.")
    if t.lr <= 0 or (t.lr_heads is not None and t.lr_heads <= 0):
        raise ConfigError(f"train.lr={t.lr} and train.lr_heads={t.lr_heads} must be > 0 "
                          f"(lr_heads null = lr).")
    if t.weight_decay < 0 or t.max_grad_norm <= 0:
        raise ConfigError(f"train.weight_decay={t.weight_decay} must be >= 0 and "
                          f"train.max_grad_norm={t.max_grad_norm} > 0.")
    if t.recon_weight < 0 or t.align_weight < 0 or t.recon_weight == t.align_weight == 0:
        raise ConfigError(f"train.recon_weight={t.recon_weight} and train.align_weight="
                          f"{t.align_weight} must be >= 0 and not both 0.")
    if t.use_gpu is False and t.gpus_per_worker > 0:
        raise ConfigError(
            f"train.gpus_per_worker={t.gpus_per_worker} with train.use_gpu=false: set "
            f"train.use_gpu=true to train on GPUs, or gpus_per_worker=0."
        )


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


def fault_from_env() -> dict[str, Any] | None:
    raw = os.environ.get(FAULT_ENV)
    if not raw:
        return None
    fault = json.loads(raw)
    return {"step": int(fault["step"]), "rank": int(fault.get("rank", 0)), "marker": str(fault["marker"])}


def run_train(cfg: DictConfig) -> dict:
    """Train the encoder on ``train.data_dir``; write ``final/``, curves and a summary."""
    from ray.train import (
        CheckpointConfig,
        DataConfig,
        FailureConfig,
        LoggingConfig,
        RunConfig,
        ScalingConfig,
    )
    from ray.train.torch import TorchTrainer

    check_train_config(cfg)
    t = cfg.train
    check_tracking(t.tracking)
    plan = plan_batches(t.batch_size, t.num_workers, t.grad_accum_steps)
    info = inspect_dataset(str(t.data_dir))
    teacher_dim = train_data.check_data_against_config(
        info, teacher_dim=cfg.model.teacher_dim, plan=plan
    )
    storage = storage_path(cfg)
    if t.resume:
        name = latest_run_name(storage)
        if name is None:
            raise ConfigError(
                f"train.resume=true but no run with a checkpoint exists under {storage!r}. "
                f"Train without --resume first (or set cluster.storage_path to the old runs)."
            )
        log.info("Resuming run %s from its latest checkpoint", name)
    else:
        name = new_run_name()

    val_ids = train_data.validation_ids(info, val_rows=int(t.val_rows), seed=int(t.seed))
    val_rows = train_data.read_validation_rows(info, val_ids)
    unused = train_data.unused_ids(info, val_ids=val_ids, max_rows=t.max_rows, seed=int(t.seed))
    n, total, total_sq = train_data.target_moments(info, exclude_ids=val_ids | unused)
    stats = TargetStats.from_moments(n, torch.from_numpy(total), torch.from_numpy(total_sq))
    probe = train_data.read_probe_rows(
        info, max(int(t.probe_rows), int(t.calibration_rows)), exclude_ids=val_ids | unused
    )
    steps = total_steps(t.max_steps, t.epochs, n, plan)
    log.info(
        "Targets: %d training rows, %d held out; mean-vector MSE %.5f, zero-vector MSE %.5f",
        n, len(val_rows), stats.mean_vector_mse, stats.zero_vector_mse,
    )
    resources = {"CPU": float(t.cpus_per_worker)}
    if t.use_gpu:
        resources["GPU"] = float(t.gpus_per_worker or 1.0)
    with warnings.catch_warnings():  # Ray's own use of a deprecated field, nothing to act on
        warnings.filterwarnings("ignore", message=".*exclude_resources.*")
        ingest = DataConfig.default_ingest_options()
    ingest.preserve_order = True  # the same rows reach the same worker on every (re)start
    c = typed(cfg)
    worker = WorkerConfig(
        model=c.model,
        train=c.train,
        cache_dir=c.cache_dir,
        plan=plan,
        total_steps=steps,
        teacher_dim=teacher_dim,
        target_stats=stats,
        val=val_rows,
        probe=probe.head(int(t.probe_rows)),
        calibration=tuple(probe.queries[: int(t.calibration_rows)])
        if t.head_init == "calibrated" else (),
        fault=fault_from_env(),
    )
    loop_config = {WORKER_KEY: worker}
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config=loop_config,
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
        datasets={"train": train_data.read_train_dataset(info, exclude_ids=val_ids | unused)},
        dataset_config=DataConfig(execution_options=ingest),
    )
    log.info(
        "Training %d steps: global batch %d = %d rows x %d workers x %d accumulation; %d "
        "training rows of %d", steps, plan.global_batch, plan.micro_batch, plan.num_workers,
        plan.grad_accum_steps, n, info.num_rows,
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
