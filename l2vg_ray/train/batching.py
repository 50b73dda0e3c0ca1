"""Batch arithmetic (pure): global batch = micro-batch x workers x accumulation steps.

Each worker reads an equal share of the rows (Ray Data's ``streaming_split(equal=True)`` drops
the remainder) and cuts it into full micro-batches (``drop_last``), so every worker runs the same
number of micro-batches per epoch and the position in the data is one number per worker.
"""

from __future__ import annotations

from dataclasses import dataclass

from l2vg_ray.config import ConfigError


@dataclass(frozen=True)
class BatchPlan:
    global_batch: int
    num_workers: int
    grad_accum_steps: int

    @property
    def micro_batch(self) -> int:
        """Rows per worker per forward/backward pass."""
        return self.global_batch // (self.num_workers * self.grad_accum_steps)


def plan_batches(global_batch: int, num_workers: int, grad_accum_steps: int) -> BatchPlan:
    """Check the split of ``train.batch_size`` over workers and accumulation steps."""
    for key, value in (
        ("train.batch_size", global_batch),
        ("train.num_workers", num_workers),
        ("train.grad_accum_steps", grad_accum_steps),
    ):
        if value < 1:
            raise ConfigError(f"{key} must be >= 1, got {value}.")
    per_step = num_workers * grad_accum_steps
    if global_batch % per_step:
        raise ConfigError(
            f"train.batch_size={global_batch} is not divisible by train.num_workers x "
            f"train.grad_accum_steps = {num_workers} x {grad_accum_steps} = {per_step}. "
            f"Use a batch size that is a multiple of {per_step}."
        )
    return BatchPlan(global_batch, num_workers, grad_accum_steps)


def micro_batches_per_epoch(total_rows: int, plan: BatchPlan) -> int:
    """Full micro-batches each worker sees in one pass over ``total_rows`` rows."""
    return (total_rows // plan.num_workers) // plan.micro_batch


def total_steps(max_steps: int, epochs: int | None, total_rows: int, plan: BatchPlan) -> int:
    """Optimiser steps to run: ``max_steps``, capped at ``epochs`` passes when that is set.

    An optimiser step may straddle two epochs (the micro-batch stream simply continues).
    """
    if epochs is None:
        return max_steps
    per_epoch = micro_batches_per_epoch(total_rows, plan)
    return max(1, min(max_steps, (epochs * per_epoch) // plan.grad_accum_steps))


def data_position(micro_batches_done: int, per_epoch: int) -> tuple[int, int]:
    """(epoch, index of the next micro-batch within it) after ``micro_batches_done`` batches."""
    if per_epoch < 1:
        raise ValueError(f"per_epoch must be >= 1, got {per_epoch}.")
    return divmod(micro_batches_done, per_epoch)
