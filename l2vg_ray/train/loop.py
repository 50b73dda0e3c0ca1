"""``train_loop_per_worker``: one code path for 1 worker, N workers and N nodes.

Gradient synchronisation: only the trainable tensors (special-token rows, two heads) enter the
all-reduce. They are gathered in a small ``nn.Module`` (``TrainableParams``) that DDP wraps; the
encoder - and with it the frozen LLM - is held as a plain attribute, so DDP neither broadcasts
nor buckets the backbone. DDP (rather than a manual all-reduce after backward) is used because it
overlaps the bucketed all-reduce with the rest of the backward pass and gives ``no_sync`` for
accumulation steps; with one worker there is nothing to synchronise and the module is not wrapped.

Reporting: every step's metrics go into the run's history (``metrics.csv``, saved in each
checkpoint); ``ray.train.report`` is called at most every ``train.report_every_s`` seconds (rank
0's clock, shared through the step's all-reduce so every worker reports at the same step), on
checkpoint steps and at the end; log lines every ``train.log_every`` steps. Ray Train V2 hands a
worker's reports to the controller through a queue of size one that the controller drains on its
2 s health-check poll, so reporting more often than that throttles training to one step per poll
(measured: 0.5 steps/s for a 0.04 s step).
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import signal
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from l2vg_ray.config import ModelConfig, TrainConfig
from l2vg_ray.method.losses import TargetStats
from l2vg_ray.torch_utils import set_threads
from l2vg_ray.train import data as train_data
from l2vg_ray.train import state as ckpt
from l2vg_ray.train import validation
from l2vg_ray.train.batching import BatchPlan
from l2vg_ray.train.data import ValidationRows
from l2vg_ray.train.schedule import build_optimizer, build_scheduler

log = logging.getLogger(__name__)

@dataclass(frozen=True)
class WorkerConfig:
    """Everything a Ray Train worker gets (built and checked once on the driver by
    ``trainer.run_train``; ``train_loop_config={WORKER_KEY: WorkerConfig(...)}``)."""

    model: ModelConfig
    train: TrainConfig
    cache_dir: str
    plan: BatchPlan
    total_steps: int
    teacher_dim: int
    target_stats: TargetStats | None = None  # the training targets' moments
    val: ValidationRows | None = None  # held-out rows (rank 0 validates on them)
    probe: Any = None  # ProbeRows for the ridge-probe reference, or None
    calibration: tuple[str, ...] = ()  # queries for head_init=calibrated; () = no calibration
    fault: dict[str, Any] | None = None  # test-only fault injection (trainer.FAULT_ENV)


WORKER_KEY = "worker"


class TrainableParams(torch.nn.Module):
    """Holds exactly the trainable tensors; ``forward`` runs the whole encoder.

    The encoder is stored outside ``_modules`` so the frozen LLM is invisible to DDP.
    """

    def __init__(self, encoder: torch.nn.Module) -> None:
        super().__init__()
        self.params = torch.nn.ParameterList(encoder.trainable_parameters())
        object.__setattr__(self, "encoder", encoder)

    def forward(self, batch: dict[str, torch.Tensor], **weights: float) -> Any:
        return self.encoder(batch, **weights)


def _device(t: TrainConfig) -> torch.device:
    if t.use_gpu:
        import ray.train.torch

        return ray.train.torch.get_device()
    return torch.device("cpu")


def _autocast(t: TrainConfig, device: torch.device) -> contextlib.AbstractContextManager:
    """bf16 autocast on GPU (``train.precision=auto|bf16``), plain fp32 on CPU."""
    precision = t.precision
    if device.type == "cuda" and precision in ("auto", "bf16"):
        return torch.autocast("cuda", dtype=torch.bfloat16)
    if precision == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _maybe_fault(fault: dict | None, *, step: int, rank: int, last_checkpoint: str | None) -> None:
    """Kill this worker (SIGKILL, no cleanup) after ``fault["step"]``, once per marker file.

    It first waits until Ray Train has recorded ``last_checkpoint`` in the run's snapshot, so the
    test knows which checkpoint the restart must come from (a real crash right after a report
    may also lose that report and restart from the checkpoint before).
    """
    if not fault or fault["step"] != step or fault["rank"] != rank:
        return
    marker = Path(fault["marker"])
    if marker.exists():  # already failed once: the restarted run goes on
        return
    if last_checkpoint is not None:
        import ray.train

        storage = ray.train.get_context().get_storage()
        snapshot = f"{storage.experiment_fs_path}/{ckpt.SNAPSHOT_FILE}"
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                with storage.storage_filesystem.open_input_stream(snapshot) as f:
                    if last_checkpoint in f.read().decode():
                        break
            except FileNotFoundError:
                pass
            time.sleep(0.2)
    marker.parent.mkdir(parents=True, exist_ok=True)
    marker.write_text(f"killed rank {rank} at step {step}\n")
    log.warning("Fault injection: SIGKILL to worker rank %d at step %d", rank, step)
    os.kill(os.getpid(), signal.SIGKILL)


def _checkpoint_name(step: int) -> str:
    return f"checkpoint_{step:08d}"


def _to_device(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    if device.type == "cpu":
        return batch
    return {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}


def _float(x: torch.Tensor | None) -> float:
    return math.nan if x is None else float(x.detach().float())


def _references(
    encoder: Any, probe: Any, stats: TargetStats | None, val: ValidationRows, batch_size: int,
) -> dict[str, Any]:
    """Zero-vector, mean-vector and ridge-probe references on the held-out rows (once a run)."""
    if stats is None:
        return {}
    refs = validation.trivial_references(stats, torch.tensor(val.teacher))
    if probe is not None and len(probe):
        refs = validation.probe_reference(
            encoder, refs, probe.queries, probe.teacher, val, batch_size=max(8, batch_size)
        )
    return refs.as_dict()


def _validate(encoder: Any, val: ValidationRows, batch_size: int, weights: dict) -> dict:
    return validation.validate(
        encoder, val, batch_size=max(8, batch_size), recon_weight=weights["recon_weight"],
        align_loss=weights["align_loss"], target_stats=weights["target_stats"],
    )


def _val_line(m: dict[str, Any], refs: dict[str, Any]) -> str:
    probe = refs.get("probe_mse")
    return (
        f"held-out align MSE {m.get('val_align_mse', math.nan):.5f} (cos "
        f"{m.get('val_align_cos', math.nan):.3f}), recon {m.get('val_recon_loss', math.nan):.3f}; "
        f"references: zero {refs.get('zero_mse', math.nan):.5f}, mean "
        f"{refs.get('mean_mse', math.nan):.5f}, ridge probe "
        f"{probe if probe is None else format(probe, '.5f')}"
    )


def train_loop_per_worker(config: dict[str, Any]) -> None:
    import ray.train

    from l2vg_ray.method import L2VGEncoder

    job: WorkerConfig = config[WORKER_KEY]
    t = job.train
    plan = job.plan
    total_steps = job.total_steps
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    set_threads(t.cpus_per_worker)
    device = _device(t)

    # Same seed on every rank: identical initial trainable tensors (DDP also broadcasts rank 0's).
    # model.gradient_checkpointing is applied by the encoder itself.
    ckpt.seed_everything(t.seed)
    encoder = L2VGEncoder.from_config(
        job.model, cache_dir=job.cache_dir, device=str(device), teacher_dim=job.teacher_dim
    )
    params = encoder.trainable_parameters()
    optimizer = build_optimizer(
        params, lr=t.lr, weight_decay=t.weight_decay,
        head_params=encoder.head_parameters(), lr_heads=t.lr_heads,
    )
    scheduler = build_scheduler(
        optimizer, kind=t.scheduler, warmup_steps=t.warmup_steps,
        total_steps=int(t.schedule_steps or total_steps),
    )
    state = ckpt.TrainState()
    ckpt.seed_everything(t.seed + 1000 + rank)  # per-worker streams from here on

    stats = job.target_stats
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None and job.calibration:
        # A fresh run: same queries and model on every rank -> the same calibrated heads.
        scales = encoder.calibrate_heads(
            list(job.calibration),
            target_mean=stats.mean if stats is not None else None,
            target_std=math.sqrt(stats.mean_vector_mse) if stats is not None else None,
        )
        log.info("Rank %d calibrated the heads: %s", rank, scales)
    if checkpoint is not None:
        with checkpoint.as_directory() as d:
            ckpt.load_trainable(d, encoder)
            payload = ckpt.read_train_state(d)
            optimizer.load_state_dict(payload["optimizer"])
            scheduler.load_state_dict(payload["scheduler"])
            state = payload["state"]
            state.resumes.append(state.step)
            mine = ckpt.read_rank_state(d, rank)
            if mine is not None and payload["world_size"] == world:
                ckpt.restore_rng(mine["rng"])
            else:
                log.warning(
                    "Checkpoint from %d workers resumed on %d: RNG states and data order differ "
                    "from an uninterrupted run.", payload["world_size"], world
                )
        log.info("Rank %d resumed at step %d (epoch %d, batch %d)", rank, state.step, state.epoch, state.index)

    model: torch.nn.Module = TrainableParams(encoder)
    if world > 1:
        from torch.nn.parallel import DistributedDataParallel

        model = DistributedDataParallel(
            model,
            device_ids=[device.index] if device.type == "cuda" else None,
            # A zero-weighted loss leaves its head unused; DDP must then not wait for its grads.
            find_unused_parameters=t.recon_weight == 0 or t.align_weight == 0,
        )

    batches = train_data.micro_batch_stream(
        ray.train.get_dataset_shard("train"),
        micro_batch=plan.micro_batch,
        seed=t.seed,
        rank=rank,
        shuffle_buffer=t.shuffle_buffer,
        start=(state.epoch, state.index),
    )
    weights = {
        "recon_weight": float(t.recon_weight),
        "align_weight": float(t.align_weight),
        "align_loss": str(t.align_loss),
        "target_stats": stats.to(device) if stats is not None else None,
    }
    val_rows = job.val
    if rank == 0 and val_rows is not None and len(val_rows) and not state.references:
        state.references = _references(encoder, job.probe, stats, val_rows, plan.micro_batch)
        state.history.append({"step": 0, **_validate(encoder, val_rows, plan.micro_batch, weights)})
        log.info("step 0: %s", _val_line(state.history[-1], state.references))
    encoder.train()
    last_report = time.monotonic()
    while state.step < total_steps:
        start = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        # loss, recon, align, examples, tokens, and rank 0's "a report is due" flag (summed by
        # the all-reduce below, so every worker takes the same decision at the same step).
        sums = torch.zeros(6, dtype=torch.float64)
        lr = scheduler.get_last_lr()[0]
        for micro in range(plan.grad_accum_steps):
            epoch, index, rows = next(batches)
            queries, responses, teacher = train_data.batch_lists(rows)
            batch = encoder.prepare_batch(queries, responses, torch.from_numpy(teacher))
            batch = _to_device(batch, device)
            last = micro == plan.grad_accum_steps - 1
            sync = contextlib.nullcontext() if last or world == 1 else model.no_sync()
            with sync:
                with _autocast(t, device):
                    out = model(batch, **weights)
                (out.loss / plan.grad_accum_steps).backward()
            sums += torch.tensor(
                [_float(out.loss), _float(out.recon_loss), _float(out.align_loss),
                 len(queries), float(out.n_response_tokens), 0.0],
                dtype=torch.float64,
            )
            state.epoch, state.index = epoch, index + 1
        grad_norm = torch.nn.utils.clip_grad_norm_(params, t.max_grad_norm)
        optimizer.step()
        scheduler.step()
        state.step += 1
        if rank == 0 and time.monotonic() - last_report >= float(t.report_every_s):
            sums[5] = 1.0
        if world > 1:  # the curves show the global batch, not rank 0's share
            torch.distributed.all_reduce(sums)
        elapsed = time.perf_counter() - start
        state.examples += int(sums[3])
        n_micro = plan.grad_accum_steps * world
        metrics = {
            "step": state.step,
            "epoch": state.epoch,
            "loss": float(sums[0]) / n_micro,
            "recon_loss": float(sums[1]) / n_micro,
            "align_loss": float(sums[2]) / n_micro,
            "lr": lr,
            "grad_norm": float(grad_norm),
            "examples_per_s": float(sums[3]) / elapsed,
            "tokens_per_s": float(sums[4]) / elapsed,
            "step_time_s": elapsed,
            "time": time.time(),  # wall clock: steady-state steps/s including reporting
        }
        if rank == 0 and val_rows is not None and len(val_rows) and (
            state.step % t.eval_every == 0 or state.step == total_steps
        ):
            metrics.update(_validate(encoder, val_rows, plan.micro_batch, weights))
            log.info("step %d: %s", state.step, _val_line(metrics, state.references))
        state.history.append(metrics)
        report_now = bool(sums[5] > 0) or state.step == total_steps
        if rank == 0 and (state.step % t.log_every == 0 or state.step in (1, total_steps)):
            log.info(
                "step %d/%d loss %.4f (recon %.4f, align %.5f) lr %.2e %.1f ex/s",
                state.step, total_steps, metrics["loss"], metrics["recon_loss"],
                metrics["align_loss"], lr, metrics["examples_per_s"],
            )
        last_ckpt = (state.step - 1) // t.checkpoint_every * t.checkpoint_every
        _maybe_fault(
            job.fault, step=state.step, rank=rank,
            last_checkpoint=_checkpoint_name(last_ckpt) if last_ckpt > 0 else None,
        )
        if state.step % t.checkpoint_every == 0 or state.step == total_steps:
            with tempfile.TemporaryDirectory(prefix="l2vg-ckpt-") as tmp:
                ckpt.write_checkpoint(
                    tmp, rank=rank, state=state, world_size=world,
                    **({"encoder": encoder, "optimizer": optimizer, "scheduler": scheduler}
                       if rank == 0 else {}),
                )
                ray.train.report(
                    metrics,
                    checkpoint=ray.train.Checkpoint.from_directory(tmp),
                    checkpoint_dir_name=_checkpoint_name(state.step),
                )
            last_report = time.monotonic()
        elif report_now:
            ray.train.report(metrics)
            last_report = time.monotonic()
