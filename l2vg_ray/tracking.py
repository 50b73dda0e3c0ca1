"""Experiment tracking: a stage's config, per-step metrics, curves, tables and model to MLflow
(or Weights & Biases), from the driver once the stage has finished.

``train.tracking`` / ``eval.tracking`` (``TrackingConfig``) turn it on: ``kind: mlflow`` logs to
``uri`` (a tracking server, Databricks, any MLflow store) or, when ``uri`` is null, to a local
store in ``${output_dir}/mlruns`` (a sqlite database and the artifacts beside it; browse it with
``mlflow ui --backend-store-uri sqlite:///<output_dir>/mlruns/mlflow.db``). ``kind: wandb`` logs
the same through the same interface. Both are optional dependencies (``pip install
'l2vg-ray[tracking]'``); a missing one is a clear error before the stage runs.

Logging from the driver after the stage keeps the training workers free of tracking clients
and never loses a step: every row of ``metrics.csv`` is logged with its step.
"""

from __future__ import annotations

import csv
import logging
import math
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Protocol

from l2vg_ray.config import ConfigError
from l2vg_ray.registry import Registry

log = logging.getLogger(__name__)


class Tracker(Protocol):
    """One tracked run."""

    run_id: str

    def log_params(self, params: Mapping[str, Any]) -> None: ...

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None: ...

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None: ...

    def log_table(self, rows: list[dict[str, Any]], name: str) -> None: ...

    def close(self) -> None: ...


TRACKERS: Registry[Any] = Registry("tracker", hint="Set train.tracking.kind / eval.tracking.kind.")


def flatten(obj: Any, prefix: str = "") -> dict[str, Any]:
    """Nested dicts/lists -> ``{"a.b.c": value}`` (lists of scalars as one string)."""
    out: dict[str, Any] = {}
    if isinstance(obj, Mapping):
        for k, v in obj.items():
            out.update(flatten(v, f"{prefix}{k}."))
    elif isinstance(obj, list) and any(isinstance(v, (Mapping, list)) for v in obj):
        for i, v in enumerate(obj):
            out.update(flatten(v, f"{prefix}{i}."))
    else:
        out[prefix.rstrip(".")] = obj
    return out


def _numbers(row: Mapping[str, Any]) -> dict[str, float]:
    out = {}
    for k, v in row.items():
        try:
            x = float(v)
        except (TypeError, ValueError):
            continue
        if math.isfinite(x):
            out[k] = x
    return out


@TRACKERS.register("mlflow")
class MLflowTracker:
    def __init__(self, *, uri: str | None, experiment: str, run_name: str, local_dir: Path) -> None:
        try:
            import mlflow
        except ImportError:
            raise ConfigError(
                "tracking.kind=mlflow needs MLflow: pip install 'l2vg-ray[tracking]' (or "
                "mlflow-skinny sqlalchemy alembic)."
            ) from None
        from mlflow.tracking import MlflowClient

        artifacts = None
        if uri is None:  # a local store that keeps its artifacts beside it, not in the cwd
            local_dir.mkdir(parents=True, exist_ok=True)
            uri = f"sqlite:///{(local_dir / 'mlflow.db').resolve()}"
            artifacts = (local_dir / "artifacts").resolve().as_uri()
        self.uri = uri
        self.client = MlflowClient(tracking_uri=uri)
        exp = self.client.get_experiment_by_name(experiment)
        exp_id = (
            exp.experiment_id
            if exp is not None
            else self.client.create_experiment(experiment, artifact_location=artifacts)
        )
        self.run_id = self.client.create_run(exp_id, run_name=run_name).info.run_id
        self._mlflow = mlflow

    def log_params(self, params: Mapping[str, Any]) -> None:
        from mlflow.entities import Param

        items = [Param(k, str(v)[:6000]) for k, v in params.items()]
        for s in range(0, len(items), 100):  # MLflow's batch limit
            self.client.log_batch(self.run_id, params=items[s : s + 100])

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        import time

        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        items = [Metric(k, float(v), now, int(step or 0)) for k, v in metrics.items()]
        for s in range(0, len(items), 1000):
            self.client.log_batch(self.run_id, metrics=items[s : s + 1000])

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        path = Path(path)
        if path.is_dir():
            self.client.log_artifacts(self.run_id, str(path), artifact_path or path.name)
        else:
            self.client.log_artifact(self.run_id, str(path), artifact_path)

    def log_table(self, rows: list[dict[str, Any]], name: str) -> None:
        self.client.log_dict(self.run_id, {"rows": rows}, f"{name}.json")

    def close(self) -> None:
        self.client.set_terminated(self.run_id)


@TRACKERS.register("wandb")
class WandbTracker:
    def __init__(self, *, uri: str | None, experiment: str, run_name: str, local_dir: Path) -> None:
        try:
            import wandb
        except ImportError:
            raise ConfigError(
                "tracking.kind=wandb needs Weights & Biases: pip install wandb (and `wandb "
                "login`, or WANDB_MODE=offline)."
            ) from None
        local_dir.mkdir(parents=True, exist_ok=True)
        self.run = wandb.init(project=experiment, name=run_name, dir=str(local_dir), reinit=True)
        self.run_id = str(self.run.id)
        self._wandb = wandb

    def log_params(self, params: Mapping[str, Any]) -> None:
        self.run.config.update(dict(params), allow_val_change=True)

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        self.run.log(dict(metrics), step=step)

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        path = Path(path)
        art = self._wandb.Artifact(artifact_path or path.name.replace("/", "-"), type="file")
        art.add_dir(str(path)) if path.is_dir() else art.add_file(str(path))
        self.run.log_artifact(art)

    def log_table(self, rows: list[dict[str, Any]], name: str) -> None:
        cols = sorted({k for r in rows for k in r})
        table = self._wandb.Table(columns=cols, data=[[r.get(c) for c in cols] for r in rows])
        self.run.log({name: table})

    def close(self) -> None:
        self.run.finish()


@contextmanager
def tracked(cfg: Any, stage: str) -> Iterator[Tracker | None]:
    """The stage's tracker (``cfg.<stage>.tracking``), or None when tracking is off."""
    tcfg = getattr(cfg, stage).tracking
    if not tcfg.kind:
        yield None
        return
    cls = TRACKERS.get(str(tcfg.kind))
    tracker = cls(
        uri=tcfg.uri,
        experiment=str(tcfg.experiment),
        run_name=str(tcfg.run_name or f"{cfg.name}-{stage}"),
        local_dir=Path(str(cfg.output_dir)) / "mlruns",
    )
    try:
        yield tracker
    finally:
        tracker.close()
    log.info("Tracked %s as %s run %s", stage, tcfg.kind, tracker.run_id)


def log_training(tracker: Tracker, cfg: Any, summary: Mapping[str, Any]) -> None:
    """The training config, every row of metrics.csv at its step, the curves and the model."""
    from l2vg_ray.config import to_dict

    plain = to_dict(cfg)
    tracker.log_params(flatten({k: plain[k] for k in ("name", "model", "train", "teacher")}))
    with open(summary["metrics_csv"], newline="") as f:
        for row in csv.DictReader(f):
            step = int(float(row.pop("step")))
            values = _numbers(row)
            if values:
                tracker.log_metrics(values, step=step)
    final = {k: v for k, v in summary.items() if isinstance(v, (int, float)) and k != "steps"}
    tracker.log_metrics({f"summary.{k}": v for k, v in final.items()}, step=int(summary["steps"]))
    tracker.log_artifact(summary["curves_png"])
    tracker.log_artifact(summary["metrics_csv"])
    if cfg.train.tracking.log_model:
        tracker.log_artifact(summary["final_dir"], "model")


def log_evaluation(tracker: Tracker, cfg: Any, result: Mapping[str, Any]) -> None:
    """The eval settings, every task's main score, the per-type means and the results table."""
    from l2vg_ray.config import to_dict

    plain = to_dict(cfg)
    tracker.log_params(flatten({"eval": plain["eval"], "name": plain["name"]}))
    scores = {f"score.{k}": v for k, v in (result.get("scores") or {}).items() if v is not None}
    means = {f"mean.{k}": v for k, v in (result.get("mean_by_type") or {}).items()}
    if result.get("mean_main_score") is not None:
        means["mean_main_score"] = result["mean_main_score"]
    tracker.log_metrics({**scores, **means}, step=0)
    files = result.get("files") or {}
    for path in files.values():
        if path and Path(path).is_file():
            tracker.log_artifact(path, "eval")
    tracker.log_table(
        [{"task": t, "main_score": s} for t, s in (result.get("scores") or {}).items()], "scores"
    )
