"""Checkpoint layout and RNG states.

A checkpoint directory (one per ``checkpoint_every`` steps, merged from every worker by Ray Train)::

    encoder/              L2VGEncoder.save: l2vg_config.json + the trainable tensors  (rank 0)
    train_state.pt        optimiser, scheduler, step, data position, metric history  (rank 0)
    rng/rank_00000.pt     torch / numpy / python RNG states and data position          (each rank)

Only the trainable tensors and their AdamW moments are stored: the frozen LLM is rebuilt from the
config in ``encoder/l2vg_config.json``.
"""

from __future__ import annotations

import random
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from l2vg_ray.method.model import TRAINABLE_FILE  # what L2VGEncoder.save writes

if TYPE_CHECKING:
    from l2vg_ray.method import L2VGEncoder

ENCODER_DIR = "encoder"
TRAIN_STATE_FILE = "train_state.pt"
RNG_DIR = "rng"
SNAPSHOT_FILE = "checkpoint_manager_snapshot.json"  # written by Ray Train V2 per run


@dataclass
class TrainState:
    """Where the run is: optimiser steps done, next micro-batch (epoch, index), curves so far,
    and the steps it was resumed at (after a worker failure or ``--resume``)."""

    step: int = 0
    epoch: int = 0
    index: int = 0
    examples: int = 0
    history: list[dict[str, float]] = field(default_factory=list)
    resumes: list[int] = field(default_factory=list)  # the step of each restore from a checkpoint
    # Held-out references (validation.References.as_dict()), computed once at the start.
    references: dict[str, Any] = field(default_factory=dict)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def capture_rng() -> dict[str, Any]:
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def rank_file(directory: str | Path, rank: int) -> Path:
    return Path(directory) / RNG_DIR / f"rank_{rank:05d}.pt"


def write_checkpoint(
    directory: str | Path,
    *,
    rank: int,
    state: TrainState,
    encoder: L2VGEncoder | None = None,  # only rank 0 passes it (and the optimiser, scheduler)
    optimizer: torch.optim.Optimizer | None = None,
    scheduler: torch.optim.lr_scheduler.LRScheduler | None = None,
    world_size: int = 1,
) -> Path:
    """Write this rank's part of a checkpoint into ``directory`` (rank 0 writes the shared part)."""
    directory = Path(directory)
    path = rank_file(directory, rank)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"rng": capture_rng(), "epoch": state.epoch, "index": state.index}, path)
    if rank == 0:
        if encoder is None or optimizer is None or scheduler is None:
            raise ValueError("Rank 0 writes the encoder, optimiser and scheduler: pass all three.")
        encoder.save(directory / ENCODER_DIR)
        torch.save(
            {
                "state": asdict(state),
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "world_size": world_size,
            },
            directory / TRAIN_STATE_FILE,
        )
    return directory


def read_train_state(directory: str | Path) -> dict[str, Any]:
    path = Path(directory) / TRAIN_STATE_FILE
    if not path.is_file():
        raise FileNotFoundError(
            f"{str(path)!r} is missing: {str(directory)!r} is not an l2vg training checkpoint."
        )
    # weights_only=False: the file holds RNG tuples and plain dicts written by this module.
    payload = torch.load(path, map_location="cpu", weights_only=False)
    payload["state"] = TrainState(**payload["state"])
    return payload


def read_rank_state(directory: str | Path, rank: int) -> dict[str, Any] | None:
    path = rank_file(directory, rank)
    if not path.is_file():
        return None
    return torch.load(path, map_location="cpu", weights_only=False)


def load_trainable(directory: str | Path, encoder: L2VGEncoder) -> None:
    """Load the trainable tensors saved under ``directory/encoder`` into ``encoder`` in place."""
    from safetensors.torch import load_file

    path = Path(directory) / ENCODER_DIR / TRAINABLE_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{str(path)!r} is missing: the checkpoint holds no encoder state.")
    encoder.load_trainable_state_dict(load_file(str(path)))
