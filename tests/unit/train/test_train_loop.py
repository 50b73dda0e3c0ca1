"""The loop's building blocks without Ray: DDP sees only the trainable tensors, accumulation with
``no_sync`` then a synchronised step, precision selection."""

from __future__ import annotations

import contextlib

import numpy as np
import pytest
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from l2vg_ray.testing import TINY_QUERIES
from l2vg_ray.train.loop import TrainableParams, _autocast


@pytest.fixture
def encoder(tiny_config):
    from l2vg_ray.method import L2VGEncoder

    return L2VGEncoder.from_config(tiny_config.model, cache_dir=tiny_config.cache_dir, device="cpu", teacher_dim=32)


def test_ddp_holds_and_syncs_only_the_trainable_tensors(encoder, tmp_path):
    holder = TrainableParams(encoder)
    trainable = {id(p) for p in encoder.trainable_parameters()}
    assert {id(p) for p in holder.parameters()} == trainable
    assert not any(id(p) in trainable for p in encoder.llm.parameters())

    queries = TINY_QUERIES[:2]
    teacher = torch.from_numpy(np.random.default_rng(0).standard_normal((2, 32)).astype(np.float32))
    batch = encoder.prepare_batch(queries, ["Paris.", "Bake it."], teacher)
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    try:
        ddp = DistributedDataParallel(holder)
        assert {id(p) for p in ddp.module.parameters()} == trainable  # all the reducer buckets
        with ddp.no_sync():
            (ddp(batch).loss / 2).backward()
        first = [p.grad.clone() for p in encoder.trainable_parameters()]
        (ddp(batch).loss / 2).backward()
        for g0, p in zip(first, encoder.trainable_parameters(), strict=True):
            torch.testing.assert_close(p.grad, 2 * g0)  # accumulated, then all-reduced (world 1)
        assert all(p.grad is None for p in encoder.llm.parameters())
    finally:
        dist.destroy_process_group()


def test_precision_choice(tiny_config):
    cpu = torch.device("cpu")
    assert isinstance(_autocast(tiny_config.train, cpu), contextlib.nullcontext)  # auto on CPU: fp32
    tiny_config.train.precision = "bf16"
    ctx = _autocast(tiny_config.train, cpu)
    assert isinstance(ctx, torch.autocast) and ctx.fast_dtype == torch.bfloat16
