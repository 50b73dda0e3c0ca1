"""The Ray Train worker: ``train_loop_per_worker`` runs ``L2VGTrainRecipe`` (``setup`` ->
``train`` -> ``cleanup``), one code path for 1 worker, N workers and N nodes.

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
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
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
from l2vg_ray.train.faults import Fault, maybe_fail
from l2vg_ray.train.schedule import build_optimizer, build_scheduler

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class WorkerConfig:
    """Everything a Ray Train worker gets (built and checked once on the driver by
    ``trainer.prepare_inputs``; ``train_loop_config={WORKER_KEY: WorkerConfig(...)}``).

    It holds config, numbers and paths, never rows, so it stays at a few KB: Ray Train V2 passes
    ``train_loop_config`` to its controller actor's constructor, whose arguments over 100 KB go
    through the object store, which an actor that may restart cannot rely on (Ray logs an error
    from core_worker.cc, ray-project/ray#53727). The training rows travel as the Ray Dataset,
    the held-out and probe rows as Parquet files in the run's folder.
    """

    model: ModelConfig
    train: TrainConfig
    cache_dir: str
    plan: BatchPlan
    total_steps: int
    teacher_dim: int
    target_stats: TargetStats | None = None  # the training targets' moments (2 x teacher_dim)
    heldout_file: str | None = None  # the held-out rows (rank 0 validates on them); None = none
    # The first training rows: the ridge probe's (train.probe_rows) and the calibration queries
    # (train.calibration_rows); None = none.
    probe_file: str | None = None
    fault: Fault | None = None  # test-only fault injection (faults.FAULT_ENV)


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


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """What Ray Train runs on every worker: build the recipe, set it up, train, clean up."""
    recipe = L2VGTrainRecipe(config[WORKER_KEY])
    try:
        recipe.setup()
        recipe.train()
    finally:
        recipe.cleanup()


class L2VGTrainRecipe:
    """One worker's share of a run, read top to bottom: ``setup`` -> ``train`` -> ``cleanup``.

    ``setup`` builds what the run holds (encoder, optimiser, schedule, DDP wrapper, data stream,
    held-out rows) and restores it from Ray Train's checkpoint when there is one; ``train`` runs
    the optimiser steps (``train_step``), the held-out evaluation (``evaluate_heldout``), the
    reports and the checkpoints (``save_checkpoint``); ``cleanup`` releases what ``setup`` took.
    """

    def __init__(self, job: WorkerConfig) -> None:
        import ray.train

        self.job, self.t, self.plan = job, job.train, job.plan
        ctx = ray.train.get_context()
        self.rank, self.world = ctx.get_world_rank(), ctx.get_world_size()
        self.device = torch.device("cpu")
        self.state = ckpt.TrainState()
        # Built by setup(); None until then, and again after cleanup().
        self.encoder: Any = None
        self.params: list[torch.nn.Parameter] = []
        self.model: torch.nn.Module | None = None
        self.optimizer: torch.optim.Optimizer | None = None
        self.scheduler: torch.optim.lr_scheduler.LRScheduler | None = None
        self.batches: Iterator[tuple[int, int, dict]] | None = None
        self.heldout: ValidationRows | None = None
        self.weights: dict[str, Any] = {}
        self.last_report = time.monotonic()

    # ------------------------------------------------------------------------------ setup
    def setup(self) -> None:
        """Model, optimiser, schedule, then the checkpoint (resume) or calibration (fresh run),
        DDP, the data stream from where the run stands, and rank 0's held-out rows."""
        import ray.train

        from l2vg_ray.method import L2VGEncoder

        job, t = self.job, self.t
        set_threads(t.cpus_per_worker)
        self.device = _device(t)
        # Same seed on every rank: identical initial trainable tensors (DDP also broadcasts rank
        # 0's). model.gradient_checkpointing is applied by the encoder itself.
        ckpt.seed_everything(t.seed)
        self.encoder = L2VGEncoder.from_config(
            job.model, cache_dir=job.cache_dir, device=str(self.device), teacher_dim=job.teacher_dim
        )
        self.encoder.objective = {"recon_weight": float(t.recon_weight),
                                  "align_weight": float(t.align_weight),
                                  "align_loss": str(t.align_loss)}
        self.params = self.encoder.trainable_parameters()
        self.optimizer = build_optimizer(
            self.params, lr=t.lr, weight_decay=t.weight_decay,
            head_params=self.encoder.head_parameters(), lr_heads=t.lr_heads,
        )
        self.scheduler = build_scheduler(
            self.optimizer, kind=t.scheduler, warmup_steps=t.warmup_steps,
            total_steps=int(t.schedule_steps or job.total_steps),
        )
        ckpt.seed_everything(t.seed + 1000 + self.rank)  # per-worker streams from here on
        checkpoint = ray.train.get_checkpoint()
        if checkpoint is None:
            self._calibrate_heads()
        else:
            self._resume(checkpoint)
        self.model = self._wrap_for_ddp()
        self.batches = train_data.micro_batch_stream(
            ray.train.get_dataset_shard("train"),
            micro_batch=self.plan.micro_batch,
            seed=t.seed,
            rank=self.rank,
            shuffle_buffer=t.shuffle_buffer,
            start=(self.state.epoch, self.state.index),
        )
        stats = job.target_stats
        self.weights = {
            "recon_weight": float(t.recon_weight),
            "align_weight": float(t.align_weight),
            "align_loss": str(t.align_loss),
            "target_stats": stats.to(self.device) if stats is not None else None,
        }
        if self.rank == 0 and job.heldout_file is not None:
            self.heldout = train_data.read_rows(job.heldout_file)

    def _calibrate_heads(self) -> None:
        """``train.head_init=calibrated`` on a fresh run: the same queries and model on every
        rank give every rank the same calibrated heads."""
        t, stats = self.t, self.job.target_stats
        if t.head_init != "calibrated" or self.job.probe_file is None:
            return
        queries = train_data.read_rows(self.job.probe_file).queries[: t.calibration_rows]
        if not queries:
            return
        scales = self.encoder.calibrate_heads(
            queries,
            target_mean=stats.mean if stats is not None else None,
            target_std=math.sqrt(stats.mean_vector_mse) if stats is not None else None,
        )
        log.info("Rank %d calibrated the heads: %s", self.rank, scales)

    def _resume(self, checkpoint: Any) -> None:
        """Trainable tensors, optimiser, schedule, position and this rank's RNG states."""
        with checkpoint.as_directory() as d:
            ckpt.load_trainable(d, self.encoder)
            payload = ckpt.read_train_state(d)
            self.optimizer.load_state_dict(payload["optimizer"])
            self.scheduler.load_state_dict(payload["scheduler"])
            self.state = payload["state"]
            self.state.resumes.append(self.state.step)
            mine = ckpt.read_rank_state(d, self.rank)
            if mine is not None and payload["world_size"] == self.world:
                ckpt.restore_rng(mine["rng"])
            else:
                log.warning(
                    "Checkpoint from %d workers resumed on %d: RNG states and data order differ "
                    "from an uninterrupted run.", payload["world_size"], self.world
                )
        s = self.state
        log.info("Rank %d resumed at step %d (epoch %d, batch %d)",
                 self.rank, s.step, s.epoch, s.index)

    def _wrap_for_ddp(self) -> torch.nn.Module:
        model: torch.nn.Module = TrainableParams(self.encoder)
        if self.world == 1:
            return model
        from torch.nn.parallel import DistributedDataParallel

        return DistributedDataParallel(
            model,
            device_ids=[self.device.index] if self.device.type == "cuda" else None,
            # A zero-weighted loss leaves its head unused; DDP must then not wait for its grads.
            find_unused_parameters=self.t.recon_weight == 0 or self.t.align_weight == 0,
        )

    # ------------------------------------------------------------------------------ train
    def train(self) -> None:
        """References and step-0 metrics once a run (rank 0), then step, evaluate, log, report
        and checkpoint until ``total_steps``."""
        import ray.train

        t, state, total = self.t, self.state, self.job.total_steps
        if self.rank == 0 and self.heldout and not state.references:
            state.references = self._references()
            state.history.append({"step": 0, **self.evaluate_heldout()})
            log.info("step 0: %s", _val_line(state.history[-1], state.references))
        self.encoder.train()
        self.last_report = time.monotonic()
        while state.step < total:
            metrics, report_due = self.train_step()
            eval_due = state.step % t.eval_every == 0 or state.step == total
            if self.rank == 0 and self.heldout and eval_due:
                metrics.update(self.evaluate_heldout())
                log.info("step %d: %s", state.step, _val_line(metrics, state.references))
            state.history.append(metrics)
            if self.rank == 0 and (state.step % t.log_every == 0 or state.step in (1, total)):
                log.info(
                    "step %d/%d loss %.4f (recon %.4f, align %.5f) lr %.2e %.1f ex/s",
                    state.step, total, metrics["loss"], metrics["recon_loss"],
                    metrics["align_loss"], metrics["lr"], metrics["examples_per_s"],
                )
            last_ckpt = (state.step - 1) // t.checkpoint_every * t.checkpoint_every
            maybe_fail(
                self.job.fault, step=state.step, rank=self.rank,
                last_checkpoint=_checkpoint_name(last_ckpt) if last_ckpt > 0 else None,
            )
            if state.step % t.checkpoint_every == 0 or state.step == total:
                self.save_checkpoint(metrics)
            elif report_due:
                ray.train.report(metrics)
                self.last_report = time.monotonic()

    def train_step(self) -> tuple[dict[str, float], bool]:
        """One optimiser step over ``grad_accum_steps`` micro-batches; returns its metrics
        (summed over every worker) and whether a report is due at this step."""
        plan, state = self.plan, self.state
        start = time.perf_counter()
        self.optimizer.zero_grad(set_to_none=True)
        # loss, recon, align, examples, tokens, and rank 0's "a report is due" flag (summed by
        # the all-reduce below, so every worker takes the same decision at the same step).
        sums = torch.zeros(6, dtype=torch.float64)
        lr = self.scheduler.get_last_lr()[0]
        for micro in range(plan.grad_accum_steps):
            sums += self._forward_backward(last=micro == plan.grad_accum_steps - 1)
        grad_norm = torch.nn.utils.clip_grad_norm_(self.params, self.t.max_grad_norm)
        self.optimizer.step()
        self.scheduler.step()
        state.step += 1
        if self.rank == 0 and time.monotonic() - self.last_report >= float(self.t.report_every_s):
            sums[5] = 1.0
        if self.world > 1:  # the curves show the global batch, not rank 0's share
            torch.distributed.all_reduce(sums)
        elapsed = time.perf_counter() - start
        state.examples += int(sums[3])
        n_micro = plan.grad_accum_steps * self.world
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
        return metrics, bool(sums[5] > 0) or state.step == self.job.total_steps

    def _forward_backward(self, *, last: bool) -> torch.Tensor:
        """Forward and backward on the next micro-batch (gradients synchronised only on the
        ``last`` of the step); returns its loss, recon, align, rows, tokens and a 0."""
        epoch, index, rows = next(self.batches)
        queries, responses, teacher = train_data.batch_lists(rows)
        batch = self.encoder.prepare_batch(queries, responses, torch.from_numpy(teacher))
        batch = _to_device(batch, self.device)
        sync = contextlib.nullcontext() if last or self.world == 1 else self.model.no_sync()
        with sync:
            with _autocast(self.t, self.device):
                out = self.model(batch, **self.weights)
            (out.loss / self.plan.grad_accum_steps).backward()
        self.state.epoch, self.state.index = epoch, index + 1
        return torch.tensor(
            [_float(out.loss), _float(out.recon_loss), _float(out.align_loss),
             len(queries), float(out.n_response_tokens), 0.0],
            dtype=torch.float64,
        )

    def evaluate_heldout(self) -> dict[str, float]:
        """Held-out metrics of the current encoder (``validation.heldout_metrics``)."""
        return validation.heldout_metrics(
            self.encoder, self.heldout, batch_size=max(8, self.plan.micro_batch),
            recon_weight=self.weights["recon_weight"], align_loss=self.weights["align_loss"],
            target_stats=self.weights["target_stats"],
        )

    def _references(self) -> dict[str, Any]:
        """Zero-vector, mean-vector and ridge-probe references on the held-out rows (once a run)."""
        stats, t = self.job.target_stats, self.t
        if stats is None:
            return {}
        refs = validation.trivial_references(stats, torch.tensor(self.heldout.teacher))
        if self.job.probe_file is not None and t.probe_rows > 0:
            probe = train_data.read_rows(self.job.probe_file).head(t.probe_rows)
            refs = validation.probe_reference(
                self.encoder, refs, probe.queries, probe.teacher, self.heldout,
                batch_size=max(8, self.plan.micro_batch),
            )
        return refs.as_dict()

    def save_checkpoint(self, metrics: dict[str, float]) -> None:
        """Write this rank's part of the checkpoint (rank 0: encoder, optimiser, schedule) and
        report it with ``metrics``; Ray Train merges the ranks' parts into one folder."""
        import ray.train

        shared = (
            {"encoder": self.encoder, "optimizer": self.optimizer, "scheduler": self.scheduler}
            if self.rank == 0 else {}
        )
        with tempfile.TemporaryDirectory(prefix="l2vg-ckpt-") as tmp:
            ckpt.write_checkpoint(
                tmp, rank=self.rank, state=self.state, world_size=self.world, **shared
            )
            ray.train.report(
                metrics,
                checkpoint=ray.train.Checkpoint.from_directory(tmp),
                checkpoint_dir_name=_checkpoint_name(self.state.step),
            )
        self.last_report = time.monotonic()

    # ------------------------------------------------------------------------------ cleanup
    def cleanup(self) -> None:
        """Release what ``setup`` took, also after a failure: the data stream (its prefetch
        threads in Ray Data) and the model and optimiser (their device memory). The process
        group is not ours: Ray Train's Torch backend creates it and tears it down."""
        if self.batches is not None:
            self.batches.close()
        self.batches = self.model = self.optimizer = self.scheduler = self.encoder = None
        self.params = []
        self.heldout = None
        if self.device.type == "cuda":
            torch.cuda.empty_cache()


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


def _checkpoint_name(step: int) -> str:
    return f"checkpoint_{step:08d}"


def _to_device(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    if device.type == "cpu":
        return batch
    return {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}


def _float(x: torch.Tensor | None) -> float:
    return math.nan if x is None else float(x.detach().float())


def _val_line(m: dict[str, Any], refs: dict[str, Any]) -> str:
    probe = refs.get("probe_mse")
    return (
        f"held-out align MSE {m.get('val_align_mse', math.nan):.5f} (cos "
        f"{m.get('val_align_cos', math.nan):.3f}), recon {m.get('val_recon_loss', math.nan):.3f}; "
        f"references: zero {refs.get('zero_mse', math.nan):.5f}, mean "
        f"{refs.get('mean_mse', math.nan):.5f}, ridge probe "
        f"{probe if probe is None else format(probe, '.5f')}"
    )
