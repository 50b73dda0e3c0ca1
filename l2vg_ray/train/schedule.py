"""Learning-rate schedules with warmup (pure functions) and the optimiser over trainable tensors."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch

SCHEDULERS = ("linear", "constant", "cosine")


def lr_multiplier(step: int, *, kind: str, warmup_steps: int, total_steps: int) -> float:
    """The factor applied to the base learning rate at optimiser step ``step`` (0-based).

    Warmup rises linearly from 0 to 1 over ``warmup_steps`` (the Hugging Face convention, so the
    paper's recipe transfers); afterwards ``linear`` decays to 0 at ``total_steps``, ``cosine``
    follows half a cosine to 0, ``constant`` stays at 1.
    """
    if kind not in SCHEDULERS:
        raise ValueError(f"train.scheduler={kind!r} is unknown; use one of {list(SCHEDULERS)}.")
    if step < warmup_steps:
        return step / max(1, warmup_steps)
    if kind == "constant":
        return 1.0
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    progress = min(max(progress, 0.0), 1.0)
    if kind == "linear":
        return 1.0 - progress
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def build_optimizer(
    params: Sequence[torch.nn.Parameter],
    *,
    lr: float,
    weight_decay: float,
    head_params: Sequence[torch.nn.Parameter] = (),
    lr_heads: float | None = None,
) -> torch.optim.AdamW:
    """AdamW over exactly the trainable tensors (the frozen LLM has no optimiser state).

    With ``lr_heads`` the ``head_params`` (a subset of ``params``) form a second parameter group
    at that rate; the schedule scales both groups alike.
    """
    params = list(params)
    if not params:
        raise ValueError("No trainable parameters: the encoder exposes nothing to optimise.")
    heads = {id(p) for p in head_params}
    if lr_heads is None or not heads:
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    groups = [
        {"params": [p for p in params if id(p) not in heads], "lr": lr},
        {"params": [p for p in params if id(p) in heads], "lr": lr_heads},
    ]
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=lr, weight_decay=weight_decay)


def build_scheduler(
    optimizer: torch.optim.Optimizer, *, kind: str, warmup_steps: int, total_steps: int
) -> torch.optim.lr_scheduler.LambdaLR:
    fn: Callable[[int], float] = lambda step: lr_multiplier(  # noqa: E731
        step, kind=kind, warmup_steps=warmup_steps, total_steps=total_steps
    )
    return torch.optim.lr_scheduler.LambdaLR(optimizer, fn)
