"""Ray Train on the tiny model, 2 CPU workers: loss goes down, checkpoints hold only the small
trainable state, and a run whose worker is SIGKILLed mid-run (restarted by FailureConfig, or
resumed with run_train(resume=True)) ends where the uninterrupted run ends."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from l2vg_ray.config import load_config
from l2vg_ray.testing import write_fixture_dataset
from l2vg_ray.train import faults, trainer
from l2vg_ray.train import state as ckpt

STEPS = 6  # 24 rows / 2 workers / micro-batch 2 = 6 micro-batches per epoch: a kill at step 3
KILL_AT = 3  # lands after checkpoint 2, so the restart must replay steps 3..6 from disk


@pytest.fixture(scope="module")
def train_data_dir(tmp_path_factory):
    return write_fixture_dataset(tmp_path_factory.mktemp("train-data"), n_rows=24, teacher_dim=32)


def make_config(out_dir, llm_dir, teacher_dir, data_dir, *extra: str):
    return load_config(
        None,
        [
            "name=tiny-train",
            f"output_dir={out_dir}",
            f"cache_dir={out_dir / 'cache'}",
            f"model.llm={llm_dir}",
            f"model.teacher={teacher_dir}",
            "model.n_thought=2",
            "model.n_compression=2",
            "model.max_length=64",
            "model.max_response_length=32",
            f"train.data_dir={data_dir}",
            "train.num_workers=2",
            "train.batch_size=4",
            f"train.max_steps={STEPS}",
            "train.warmup_steps=1",
            "train.lr=1e-2",
            "train.checkpoint_every=2",
            "train.num_to_keep=2",
            "train.shuffle_buffer=8",
            "train.seed=5",
            # The machinery under test (DDP, checkpoints, restarts), on the paper's loss and
            # heads: with random targets a 6-step run then shows a clear loss drop.
            "train.align_loss=mse",
            "train.head_init=default",
            *extra,
        ],
    )


@pytest.fixture(scope="module")
def reference(ray_session, tmp_path_factory, tiny_llm_dir, tiny_teacher_dir, train_data_dir):
    """The uninterrupted 2-worker run every other test compares with."""
    out = tmp_path_factory.mktemp("reference")
    # Tracked in MLflow (a local store under output_dir): test_training_is_tracked_in_mlflow.
    cfg = make_config(
        out, tiny_llm_dir, tiny_teacher_dir, train_data_dir, "train.tracking.kind=mlflow"
    )
    return cfg, trainer.run_train(cfg)


def trainable(final_dir):
    return load_file(str(final_dir / ckpt.TRAINABLE_FILE))


def assert_same_state(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-5, msg=lambda m, k=k: f"{k}: {m}")


def test_two_workers_reduce_the_loss_and_write_curves(reference):
    cfg, summary = reference
    assert summary["steps"] == STEPS and summary["num_workers"] == 2
    assert summary["resumed_at_steps"] == []
    history = ckpt.read_train_state(summary["checkpoint"])["state"].history
    steps = [h for h in history if "loss" in h]
    losses = [h["loss"] for h in steps]
    assert len(losses) == STEPS
    assert sum(losses[-2:]) < sum(losses[:2]), losses
    assert all(h["examples_per_s"] > 0 and h["tokens_per_s"] > 0 for h in steps)
    assert [h["lr"] for h in steps][:2] == [0.0, pytest.approx(1e-2)]  # warmup, then decay
    # Held-out validation at step 0 (before any update) and at the end, with its references.
    val = [h for h in history if "val_align_mse" in h]
    assert [h["step"] for h in val] == [0, STEPS]
    refs = summary["references"]
    assert refs["val_rows"] == 2 and refs["probe_rows"] == 22  # a tenth of 24 rows held out
    assert refs["mean_mse"] > 0 and refs["zero_mse"] > 0 and refs["probe_mse"] is not None
    assert [v["step"] for v in summary["validation"]] == [0, STEPS]
    rows = (Path(summary["metrics_csv"])).read_text().splitlines()
    assert rows[0].startswith("step,epoch,loss,recon_loss,align_loss,lr") and len(rows) == STEPS + 2
    assert "val_align_mse" in rows[0]
    assert Path(summary["curves_png"]).read_bytes()[:4] == b"\x89PNG"
    assert json.loads((Path(cfg.train.output_dir) / trainer.SUMMARY_FILE).read_text())["steps"] == STEPS


def test_training_is_tracked_in_mlflow(reference):
    import csv

    from mlflow.tracking import MlflowClient

    cfg, summary = reference
    store = Path(cfg.output_dir) / "mlruns" / "mlflow.db"
    client = MlflowClient(tracking_uri=f"sqlite:///{store}")
    run_id = summary["tracking"]["run_id"]
    written = json.loads((Path(cfg.train.output_dir) / "train_summary.json").read_text())
    assert written["tracking"] == {"kind": "mlflow", "run_id": run_id}
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and run.info.run_name == "tiny-train-train"
    assert run.data.params["train.max_steps"] == str(STEPS)
    assert run.data.params["model.n_compression"] == "2"
    with open(summary["metrics_csv"], newline="") as f:
        rows = [r for r in csv.DictReader(f) if r.get("loss")]
    history = client.get_metric_history(run_id, "loss")
    assert [m.step for m in history] == [int(float(r["step"])) for r in rows]
    assert [m.value for m in history] == pytest.approx([float(r["loss"]) for r in rows])
    assert {"curves.png", "metrics.csv", "model"} <= {a.path for a in client.list_artifacts(run_id)}
    model = {a.path for a in client.list_artifacts(run_id, "model")}
    assert f"model/{ckpt.TRAINABLE_FILE}" in model


def test_checkpoint_holds_only_the_trainable_state(reference, tiny_llm_dir):
    from l2vg_ray.method import L2VGEncoder

    _, summary = reference
    run_dir = Path(summary["checkpoint"]).parent
    kept = sorted(p.name for p in run_dir.glob("checkpoint_0*"))
    assert kept == ["checkpoint_00000004", "checkpoint_00000006"]  # num_to_keep=2
    ckpt_dir = Path(summary["checkpoint"])
    files = {str(p.relative_to(ckpt_dir)) for p in ckpt_dir.rglob("*") if p.is_file()}
    assert files == {
        "encoder/l2vg_config.json", "encoder/trainable.safetensors", "train_state.pt",
        "rng/rank_00000.pt", "rng/rank_00001.pt",
    }
    llm_bytes = sum(p.stat().st_size for p in Path(tiny_llm_dir).glob("*.safetensors"))
    ckpt_bytes = sum((ckpt_dir / f).stat().st_size for f in files)
    assert ckpt_bytes < llm_bytes / 2, (ckpt_bytes, llm_bytes)

    encoder = L2VGEncoder.load(summary["final_dir"], device="cpu")
    saved = trainable(Path(summary["final_dir"]))
    assert saved.keys() == encoder.trainable_state_dict().keys()
    assert sum(v.numel() for v in saved.values()) == sum(p.numel() for p in encoder.trainable_parameters())
    optim = ckpt.read_train_state(ckpt_dir)["optimizer"]["state"]
    assert len(optim) == len(encoder.trainable_parameters())  # AdamW moments of trainables only
    assert_same_state(saved, trainable(ckpt_dir / ckpt.ENCODER_DIR))


def test_worker_killed_mid_run_is_restarted_and_matches_the_uninterrupted_run(
    reference, tmp_path, monkeypatch, tiny_llm_dir, tiny_teacher_dir, train_data_dir
):
    _, ref = reference
    marker = tmp_path / "killed"
    monkeypatch.setenv(faults.FAULT_ENV, json.dumps({"step": KILL_AT, "rank": 1, "marker": str(marker)}))
    cfg = make_config(tmp_path, tiny_llm_dir, tiny_teacher_dir, train_data_dir, "train.max_failures=1")
    summary = trainer.run_train(cfg)
    assert marker.is_file(), "the fault hook never fired"
    assert summary["steps"] == STEPS
    assert summary["resumed_at_steps"] == [2]  # restarted from checkpoint 2, not from scratch
    assert_same_state(trainable(Path(summary["final_dir"])), trainable(Path(ref["final_dir"])))
    ref_loss = [h.get("loss") for h in ckpt.read_train_state(ref["checkpoint"])["state"].history]
    got_loss = [h.get("loss") for h in ckpt.read_train_state(summary["checkpoint"])["state"].history]
    assert got_loss == pytest.approx(ref_loss, abs=1e-6)


def test_resume_flag_continues_a_failed_run(
    reference, tmp_path, monkeypatch, tiny_llm_dir, tiny_teacher_dir, train_data_dir
):
    from ray.train import TrainingFailedError

    _, ref = reference
    marker = tmp_path / "killed"
    monkeypatch.setenv(faults.FAULT_ENV, json.dumps({"step": KILL_AT, "rank": 0, "marker": str(marker)}))
    cfg = make_config(tmp_path, tiny_llm_dir, tiny_teacher_dir, train_data_dir, "train.max_failures=0")
    with pytest.raises(TrainingFailedError):
        trainer.run_train(cfg)
    assert marker.is_file()
    summary = trainer.run_train(cfg, resume=True)
    assert summary["run_name"] == trainer.latest_run_name(trainer.storage_path(cfg))
    assert summary["resumed_at_steps"] == [2]
    assert_same_state(trainable(Path(summary["final_dir"])), trainable(Path(ref["final_dir"])))
