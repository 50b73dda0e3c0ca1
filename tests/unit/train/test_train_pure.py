"""Pure parts of the training stage: schedules, batch arithmetic, data checks, stream positions,
RNG/checkpoint state, curves. No Ray."""

from __future__ import annotations

import itertools
import json
import math
import random

import numpy as np
import pytest
import torch

from l2vg_ray import schema
from l2vg_ray.config import ConfigError
from l2vg_ray.dataset import inspect_dataset
from l2vg_ray.testing import write_fixture_dataset
from l2vg_ray.train import batching, faults, metrics, schedule, state, trainer
from l2vg_ray.train import data as train_data


# ----------------------------------------------------------------------------- schedules
def test_linear_schedule_warms_up_then_decays_to_zero():
    f = [schedule.lr_multiplier(s, kind="linear", warmup_steps=4, total_steps=12) for s in range(13)]
    assert f[:5] == [0.0, 0.25, 0.5, 0.75, 1.0]
    assert all(a > b for a, b in zip(f[4:12], f[5:13], strict=True))
    assert f[12] == 0.0 and f[8] == pytest.approx(0.5)


def test_cosine_and_constant_schedules():
    cos = [schedule.lr_multiplier(s, kind="cosine", warmup_steps=2, total_steps=10) for s in range(11)]
    assert cos[2] == 1.0 and cos[6] == pytest.approx(0.5) and cos[10] == pytest.approx(0.0)
    const = [schedule.lr_multiplier(s, kind="constant", warmup_steps=2, total_steps=10) for s in range(11)]
    assert const == [0.0, 0.5] + [1.0] * 9
    assert schedule.lr_multiplier(0, kind="linear", warmup_steps=0, total_steps=5) == 1.0


def test_unknown_schedule_names_the_choices():
    with pytest.raises(ValueError, match="linear"):
        schedule.lr_multiplier(0, kind="step", warmup_steps=0, total_steps=1)


def test_scheduler_drives_the_optimizer_lr():
    p = torch.nn.Parameter(torch.zeros(2))
    opt = schedule.build_optimizer([p], lr=1e-2, weight_decay=0.0)
    sched = schedule.build_scheduler(opt, kind="linear", warmup_steps=2, total_steps=4)
    lrs = []
    for _ in range(4):
        lrs.append(sched.get_last_lr()[0])
        opt.step()
        sched.step()
    assert lrs == pytest.approx([0.0, 5e-3, 1e-2, 5e-3])
    with pytest.raises(ValueError, match="No trainable"):
        schedule.build_optimizer([], lr=1e-3, weight_decay=0.0)


# ----------------------------------------------------------------------------- batching
def test_batch_plan_and_epoch_arithmetic():
    plan = batching.plan_batches(32, 2, 4)
    assert plan.micro_batch == 4
    # 100 rows over 2 workers = 50 each -> 12 full micro-batches of 4 per epoch
    assert batching.micro_batches_per_epoch(100, plan) == 12
    assert batching.total_steps(1000, None, 100, plan) == 1000
    assert batching.total_steps(1000, 2, 100, plan) == 6  # 24 micro-batches / 4 accumulation
    assert batching.total_steps(3, 2, 100, plan) == 3
    assert batching.data_position(0, 12) == (0, 0)
    assert batching.data_position(13, 12) == (1, 1)


@pytest.mark.parametrize(
    ("batch", "workers", "accum", "match"),
    [(10, 4, 1, "not divisible.*4 x 1"), (8, 2, 3, "multiple of 6"), (0, 1, 1, "batch_size must be >= 1")],
)
def test_bad_batch_plans_name_value_and_fix(batch, workers, accum, match):
    with pytest.raises(ConfigError, match=match):
        batching.plan_batches(batch, workers, accum)


# ----------------------------------------------------------------------------- data checks
def test_teacher_dim_mismatch_and_too_little_data(tmp_path):
    info = inspect_dataset(str(write_fixture_dataset(tmp_path / "d", n_rows=6, teacher_dim=16)))
    plan = batching.plan_batches(4, 2, 1)
    assert train_data.check_data_against_config(info, teacher_dim=None, plan=plan) == 16
    with pytest.raises(ConfigError, match=r"model.teacher_dim=384 .* 16 dims.*model.teacher_dim=16"):
        train_data.check_data_against_config(info, teacher_dim=384, plan=plan)
    with pytest.raises(ConfigError, match="6 rows: too few"):
        train_data.check_data_against_config(info, teacher_dim=16, plan=batching.plan_batches(16, 2, 1))


class FakeShard:
    """A DataIterator stand-in: rows 0..n-1, shuffled by the seed like a local shuffle buffer."""

    def __init__(self, n: int):
        self.n = n
        self.calls = 0

    def iter_batches(self, *, batch_size, batch_format, drop_last, local_shuffle_seed=None, **_):
        self.calls += 1
        order = np.arange(self.n)
        if local_shuffle_seed is not None:
            order = np.random.default_rng(local_shuffle_seed).permutation(self.n)
        stop = self.n - self.n % batch_size if drop_last else self.n
        for s in range(0, stop, batch_size):
            yield {"row": order[s : s + batch_size]}


def _take(stream, k):
    return [(e, i, b["row"].tolist()) for e, i, b in itertools.islice(stream, k)]


def test_stream_reshuffles_each_epoch_and_resumes_at_the_same_batch():
    kw = {"micro_batch": 2, "seed": 7, "rank": 0, "shuffle_buffer": 64}
    full = _take(train_data.micro_batch_stream(FakeShard(7), **kw), 9)  # 3 batches per epoch
    assert [(e, i) for e, i, _ in full[:4]] == [(0, 0), (0, 1), (0, 2), (1, 0)]
    assert full[0][2] + full[1][2] + full[2][2] != full[3][2] + full[4][2] + full[5][2]
    for done in range(1, 8):  # resume after `done` micro-batches
        start = batching.data_position(done, 3)
        resumed = _take(train_data.micro_batch_stream(FakeShard(7), **kw, start=start), 9 - done)
        assert resumed == full[done:]
    # another seed, another rank: other orders
    other = _take(train_data.micro_batch_stream(FakeShard(7), **{**kw, "rank": 1}), 3)
    assert other != full[:3]


def test_stream_without_a_full_batch_says_so():
    stream = train_data.micro_batch_stream(FakeShard(1), micro_batch=2, seed=0, rank=3, shuffle_buffer=0)
    with pytest.raises(ValueError, match="Worker 3 got no full micro-batch"):
        next(stream)


def test_batch_lists_checks_columns():
    batch = {
        schema.QUERY: np.array(["a", "b"], dtype=object),
        schema.RESPONSE: np.array(["x", "y"], dtype=object),
        schema.TEACHER_EMBEDDING: np.ones((2, 3), dtype=np.float32),
    }
    q, r, t = train_data.batch_lists(batch)
    assert q == ["a", "b"] and r == ["x", "y"] and t.shape == (2, 3) and t.dtype == np.float32
    with pytest.raises(ValueError, match="lacks.*response"):
        train_data.batch_lists({k: v for k, v in batch.items() if k != schema.RESPONSE})


# ----------------------------------------------------------------------------- state
def test_rng_states_round_trip():
    state.seed_everything(3)
    saved = state.capture_rng()
    first = (random.random(), np.random.rand(), torch.rand(1).item())
    state.seed_everything(99)
    state.restore_rng(saved)
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == first


class _TinyEncoder(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.randn(3, 2))

    def trainable_state_dict(self):
        return {"w": self.w}

    def load_trainable_state_dict(self, sd):
        with torch.no_grad():
            self.w.copy_(sd["w"])

    def save(self, path):
        from safetensors.torch import save_file

        path.mkdir(parents=True, exist_ok=True)
        save_file({"w": self.w.detach()}, str(path / state.TRAINABLE_FILE))


def test_checkpoint_round_trip(tmp_path):
    enc = _TinyEncoder()
    opt = schedule.build_optimizer(enc.parameters(), lr=0.1, weight_decay=0.0)
    sched = schedule.build_scheduler(opt, kind="linear", warmup_steps=1, total_steps=5)
    enc.w.grad = torch.ones_like(enc.w)
    opt.step()
    sched.step()
    st = state.TrainState(step=1, epoch=0, index=2, examples=8, history=[{"step": 1, "loss": 2.0}])
    for rank in (1, 0):
        state.write_checkpoint(tmp_path, rank=rank, state=st, world_size=2,
                               **({"encoder": enc, "optimizer": opt, "scheduler": sched} if rank == 0 else {}))
    with pytest.raises(ValueError, match="Rank 0 writes"):
        state.write_checkpoint(tmp_path / "x", rank=0, state=st)

    payload = state.read_train_state(tmp_path)
    assert payload["state"] == st and payload["world_size"] == 2
    assert payload["scheduler"]["last_epoch"] == 1
    assert state.read_rank_state(tmp_path, 1)["index"] == 2
    assert state.read_rank_state(tmp_path, 5) is None
    other = _TinyEncoder()
    state.load_trainable(tmp_path, other)
    assert torch.equal(other.w, enc.w)
    with pytest.raises(FileNotFoundError, match="not an l2vg training checkpoint"):
        state.read_train_state(tmp_path / "rng")


# ----------------------------------------------------------------------------- curves
def test_metrics_csv_and_plot(tmp_path):
    rows = [{"step": s, "loss": 3.0 / s, "recon_loss": 2.0 / s, "align_loss": 1.0 / s, "lr": 1e-3}
            for s in range(1, 5)]
    back = metrics.read_metrics_csv(metrics.write_metrics_csv(rows, tmp_path / "m.csv"))
    assert [r["loss"] for r in back] == pytest.approx([3.0, 1.5, 1.0, 0.75])
    assert math.isnan(back[0]["tokens_per_s"])
    png = metrics.plot_curves(rows, tmp_path / "c.png", title="t")
    assert png.read_bytes()[:4] == b"\x89PNG"


# ----------------------------------------------------------------------------- trainer helpers
def test_latest_run_name_picks_the_newest_run_with_a_checkpoint(tmp_path):
    assert trainer.latest_run_name(str(tmp_path / "none")) is None
    for name, snapshot in (("train-20260101-000000-aaaaaa", True),
                           ("train-20260102-000000-bbbbbb", True),
                           ("train-20260103-000000-cccccc", False), ("other", True)):
        (tmp_path / name).mkdir()
        if snapshot:
            (tmp_path / name / trainer.SNAPSHOT_FILE).write_text("{}")
    assert trainer.latest_run_name(str(tmp_path)) == "train-20260102-000000-bbbbbb"
    assert trainer.new_run_name() > "train-20260103"


def test_fault_injection_is_read_from_the_environment(monkeypatch, tmp_path):
    monkeypatch.delenv(faults.FAULT_ENV, raising=False)
    assert faults.fault_from_env() is None
    monkeypatch.setenv(faults.FAULT_ENV, json.dumps({"step": 3, "marker": "/tmp/m"}))
    assert faults.fault_from_env() == faults.Fault(step=3, rank=0, marker="/tmp/m")
    # Not due (another step or rank, or its marker exists): the worker goes on.
    fault = faults.Fault(step=3, rank=1, marker=str(tmp_path / "m"))
    faults.maybe_fail(fault, step=2, rank=1, last_checkpoint=None)
    faults.maybe_fail(fault, step=3, rank=0, last_checkpoint=None)
    (tmp_path / "m").write_text("")
    faults.maybe_fail(fault, step=3, rank=1, last_checkpoint=None)
    faults.maybe_fail(None, step=3, rank=1, last_checkpoint=None)


def test_optimizer_puts_the_heads_in_their_own_group_at_lr_heads():
    import torch

    from l2vg_ray.train.schedule import build_optimizer

    tokens = torch.nn.Parameter(torch.zeros(3, 4))
    head = torch.nn.Parameter(torch.zeros(4, 4))
    opt = build_optimizer([tokens, head], lr=1e-3, weight_decay=0.0)
    assert [g["lr"] for g in opt.param_groups] == [1e-3]
    opt = build_optimizer([tokens, head], lr=1e-3, weight_decay=0.0, head_params=[head], lr_heads=1e-4)
    assert [g["lr"] for g in opt.param_groups] == [1e-3, 1e-4]
    assert opt.param_groups[0]["params"][0] is tokens and opt.param_groups[1]["params"][0] is head
