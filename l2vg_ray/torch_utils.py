"""Torch helpers every stage shares, written once: dtype names, device choice, thread counts,
tokenizer loading and masked mean pooling.

A foundation module (floor 1) that imports only ``l2vg_ray.config`` at import time; torch and
transformers are imported when a helper runs, so that the driver can import the stage modules
(and plan a pipeline) without them.
The exported sentence-transformers module (``resources/sentence_transformers``) is the one
exception that keeps its own copies, since it must run where l2vg-ray is not installed.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

from l2vg_ray.config import DTYPES, ConfigError

if TYPE_CHECKING:
    import torch


def torch_dtype(name: str) -> torch.dtype:
    """``float32`` / ``bfloat16`` / ``float16`` (``config.DTYPES``) -> the torch dtype."""
    import torch

    if name not in DTYPES:
        raise ConfigError(f"dtype {name!r} is not one of {list(DTYPES)}; set model.dtype to one.")
    return getattr(torch, name)


def resolve_device(spec: str | torch.device | None) -> torch.device:
    """``auto`` (or None) -> ``cuda`` when a GPU is visible (Ray hides the GPUs an actor did not
    ask for), else ``cpu``; ``cpu`` / ``cuda`` / ``cuda:N`` as given, if usable here."""
    import torch

    if spec is None or str(spec) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(spec)
    except RuntimeError:
        raise ConfigError(
            f"Unknown device {spec!r}; use model.device=auto, cpu, cuda or cuda:N."
        ) from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(
            f"model.device={str(spec)!r} but no CUDA device is visible here. Use model.device=auto "
            "or cpu, or give the stage GPUs (e.g. generate.num_gpus_per_actor)."
        )
    return device


def cpu_threads(num_cpus: float) -> int:
    """Torch threads for a process holding ``num_cpus`` of Ray's CPUs: the whole CPUs, at least 1."""
    return max(1, math.floor(float(num_cpus)))


def set_threads(num_cpus: float) -> int:
    """``torch.set_num_threads(cpu_threads(num_cpus))``; returns the count."""
    import torch

    n = cpu_threads(num_cpus)
    torch.set_num_threads(n)
    return n


def load_tokenizer(model_path: str, *, padding_side: str = "left") -> Any:
    """The model's tokenizer with a pad token (EOS when the model has none)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_path)
    tokenizer.padding_side = padding_side
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def mean_pool(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of ``hidden`` (B, T, H) over positions where ``mask`` (B, T) is 1; zeros if none."""
    m = mask.to(hidden.dtype).unsqueeze(-1)
    return (hidden * m).sum(dim=1) / m.sum(dim=1).clamp(min=1.0)
