"""The whole pipeline as one call: generate -> train -> eval (-> serve), skipping finished stages.

Each stage writes ``_STARTED.json`` into its output location when it begins and ``_SUCCESS.json``
when it ends, both holding a hash of the *stage-relevant* resolved config (plus the hash of the
stage it reads from). On the next run a stage is

- skipped when ``_SUCCESS.json`` carries the same hash (a resubmitted job resumes where it stopped);
- rerun in place when only ``_STARTED.json`` with the same hash exists (an interrupted run:
  generation resumes from its written shards, training from its last checkpoint);
- stopped with an error naming the differing keys when either marker carries a different hash:
  the old output belongs to another config and is never deleted silently. ``overwrite=True``
  (``l2vg run --overwrite``) deletes it and reruns from scratch; a generate stage whose config
  differs only in ``generate.queries`` (e.g. a higher limit) reuses the rows it already wrote.

Pure resource settings (actor counts, CPUs/GPUs, batch sizes of inference, logging cadence) are
left out of the hash: moving a run to a bigger cluster does not redo finished work.
Markers live next to the artifacts, so they work on local disks and on ``s3://``/``gs://`` alike.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from omegaconf import DictConfig

from l2vg_ray import storage
from l2vg_ray.config import (
    ConfigError,
    EvalConfig,
    GenerateConfig,
    L2VGConfig,
    ModelConfig,
    TeacherConfig,
    TrainConfig,
    load_config,
    not_hashed,
    select,
    to_dict,
    typed,
)

log = logging.getLogger(__name__)

SUCCESS = "_SUCCESS.json"
STARTED = "_STARTED.json"
STAGES = ("generate", "train", "eval")

StageFn = Callable[..., dict]  # (cfg: L2VGConfig) -> summary; train also takes resume=


@dataclass(frozen=True)
class StageSpec:
    name: str
    output_key: str  # config key of the stage's output location (where its markers go)
    sections: tuple[str, ...]  # config sections whose values define the stage's result
    upstream: str | None  # stage whose output this one reads


SPECS: dict[str, StageSpec] = {
    "generate": StageSpec("generate", "generate.output_dir", ("generate", "teacher"), None),
    "train": StageSpec("train", "train.output_dir", ("train",), "generate"),
    "eval": StageSpec("eval", "eval.output_dir", ("eval",), "train"),
}

# The model keys each stage's output depends on (None = all but NOT_HASHED["model"]): the
# special-token settings do not change generated data, so changing them reruns training only.
MODEL_KEYS: dict[str, tuple[str, ...] | None] = {
    "generate": ("llm", "teacher", "teacher_dim", "dtype"),
    "train": None,
    "eval": None,
}
# Keys that change where or how fast a stage runs, not what it produces: the fields declared
# with `resource_field` in l2vg_ray.config.
NOT_HASHED: dict[str, set[str]] = {
    "model": not_hashed(ModelConfig),
    "generate": not_hashed(GenerateConfig),
    "teacher": not_hashed(TeacherConfig),
    "train": not_hashed(TrainConfig),
    "eval": not_hashed(EvalConfig),
}


def stage_output(cfg: L2VGConfig, stage: str) -> str:
    return str(select(cfg, SPECS[stage].output_key))


def depends_on_upstream(cfg: L2VGConfig, stage: str) -> bool:
    """Whether ``stage`` reads the output of its upstream stage under this config."""
    if stage == "eval":  # eval reads the trained encoder only when eval.model points at it
        return str(cfg.eval.model).startswith(str(cfg.train.output_dir))
    return SPECS[stage].upstream is not None


def stage_fingerprint(cfg: L2VGConfig, stage: str, upstream_hash: str | None = None) -> dict:
    """The resolved config values that define ``stage``'s output (JSON-able)."""
    resolved = to_dict(cfg)
    model = _drop(resolved["model"], NOT_HASHED["model"])
    if MODEL_KEYS[stage] is not None:
        model = {k: model[k] for k in MODEL_KEYS[stage]}
    fp: dict[str, Any] = {"model": model}
    for section in SPECS[stage].sections:
        fp[section] = _drop(resolved[section], NOT_HASHED.get(section, set()))
    if stage == "eval" and depends_on_upstream(cfg, stage):
        # a location is not an identity: the trained encoder is identified by the train hash
        fp["eval"]["model"] = "<train>" + str(cfg.eval.model)[len(str(cfg.train.output_dir)) :]
    if upstream_hash is not None and depends_on_upstream(cfg, stage):
        fp["upstream"] = {SPECS[stage].upstream: upstream_hash}
    fp["seed"] = resolved["seed"]
    return fp


def config_hash(fingerprint: dict) -> str:
    blob = json.dumps(fingerprint, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def config_hashes(cfg: L2VGConfig) -> dict[str, str]:
    """Each stage's config hash, chained as ``run_pipeline`` chains them (what its markers hold)."""
    hashes: dict[str, str] = {}
    upstream: str | None = None
    for stage in STAGES:
        upstream = hashes[stage] = config_hash(stage_fingerprint(cfg, stage, upstream))
    return hashes


def config_file_hashes(path: str) -> dict[str, str]:
    """``config_hashes`` of the config file at ``path``, resolved as ``l2vg run --config path``
    resolves it (what a packaged recipe's ``config_hashes`` are compared with)."""
    return config_hashes(typed(storage.absolute_paths(load_config(path))))


def read_marker(cfg: L2VGConfig, stage: str, name: str = SUCCESS) -> dict | None:
    path = storage.join(stage_output(cfg, stage), name)
    if not storage.exists(path):
        return None
    try:
        return storage.read_json(path)
    except (ValueError, OSError) as e:  # a torn or foreign file counts as "no marker"
        log.warning("Ignoring unreadable stage marker %s: %s", path, e)
        return None


def stage_status(cfg: L2VGConfig, stage: str, digest: str) -> str:
    """``done`` (skip), ``partial`` (rerun, resume) , ``stale`` (clear, rerun) or ``new``."""
    done = read_marker(cfg, stage, SUCCESS)
    started = read_marker(cfg, stage, STARTED)
    if done is not None and done.get("config_hash") == digest:
        return "done"
    if done is not None or (started is not None and started.get("config_hash") != digest):
        return "stale"
    return "partial" if started is not None else "new"


def flat_keys(tree: Any, prefix: str = "") -> dict[str, Any]:
    """A nested fingerprint as {dotted.key: leaf value}."""
    if isinstance(tree, Mapping):
        out: dict[str, Any] = {}
        for k, v in tree.items():
            out.update(flat_keys(v, f"{prefix}{k}."))
        return out
    return {prefix.rstrip("."): tree}


def differing_keys(old: Mapping[str, Any] | None, new: Mapping[str, Any]) -> list[str]:
    """The dotted keys whose values differ between two stage fingerprints."""
    a, b = flat_keys(old or {}), flat_keys(new)
    return sorted(k for k in set(a) | set(b) if a.get(k, _MISSING) != b.get(k, _MISSING))


_MISSING = object()
# A generate stage whose config differs only here extends its data in place: the rows already
# generated are reused (run_generate refuses a query set that drops rows already written).
EXTENDABLE = {"generate": ("generate.queries.",)}


def _previous_fingerprint(cfg: L2VGConfig, stage: str) -> dict | None:
    for name in (SUCCESS, STARTED):
        marker = read_marker(cfg, stage, name)
        if marker is not None and isinstance(marker.get("config"), Mapping):
            return dict(marker["config"])
    return None


def _settle_stale(cfg: L2VGConfig, stage: str, fingerprint: dict, out: str, *,
                  overwrite: bool) -> str:
    """Output made with another config: ``partial`` when only a generate stage's query set grew
    (its rows are reused), else refused - or, with ``overwrite``, deleted (``stale``)."""
    diff = differing_keys(_previous_fingerprint(cfg, stage), fingerprint)
    prefixes = EXTENDABLE.get(stage, ())
    if diff and prefixes and all(k.startswith(prefixes) for k in diff):
        log.info("[%s] %s: only %s changed; reusing the rows already generated", stage, out,
                 ", ".join(diff))
        return "partial"
    if not overwrite:
        shown = ", ".join(diff[:12]) + (" ..." if len(diff) > 12 else "")
        raise ConfigError(
            f"[{stage}] {out} holds output made with a different config (differing keys: "
            f"{shown or 'unknown: the old marker has no config'}). Nothing was deleted. "
            f"Either give this run its own folder (name=NEW_NAME, or "
            f"{SPECS[stage].output_key}=...), or replace the old output with --overwrite."
        )
    _check_clearable(cfg, stage)
    log.warning("[%s] --overwrite: deleting %s (made with another config: %s) and rerunning",
                stage, out, ", ".join(diff))
    storage.delete(out)
    return "stale"


def run_stage(
    cfg: L2VGConfig,
    stage: str,
    fn: StageFn,
    *,
    upstream_hash: str | None = None,
    overwrite: bool = False,
) -> dict:
    """Run one stage unless its output exists for the same config; returns a record of it.

    Output made with a different config is never deleted silently: the stage stops with an
    error naming the differing keys, unless ``overwrite`` (``l2vg run --overwrite``) says to
    replace it, or the difference only extends a generate stage's query set.
    """
    fingerprint = stage_fingerprint(cfg, stage, upstream_hash)
    digest = config_hash(fingerprint)
    out = stage_output(cfg, stage)
    status = stage_status(cfg, stage, digest)
    record = {"stage": stage, "output": out, "config_hash": digest}
    if status == "done":
        log.info("[%s] skipped: %s holds its output for this config (%s)", stage, out, digest)
        return {**record, "status": "skipped", "summary": read_marker(cfg, stage)["summary"]}
    if status == "stale":
        status = _settle_stale(cfg, stage, fingerprint, out, overwrite=overwrite)
    elif status == "partial":
        log.info("[%s] resuming an interrupted run in %s", stage, out)
    started_at = time.time()
    storage.write_json(
        storage.join(out, STARTED),
        {"stage": stage, "config_hash": digest, "config": fingerprint, "started_at": started_at},
    )
    if stage == "train":
        summary = fn(cfg, resume=status == "partial" and _has_train_checkpoint(cfg))
    else:
        summary = fn(cfg)
    seconds = round(time.time() - started_at, 2)
    record = {**record, "seconds": seconds, "summary": summary}
    if isinstance(summary, Mapping) and summary.get("failed"):
        # e.g. evaluation tasks that failed: no success marker, so the next run retries them
        # (evaluation then skips the tasks that already have results).
        log.warning("[%s] finished with failures after %.1f s: %s", stage, seconds, summary["failed"])
        return {**record, "status": "incomplete"}
    if isinstance(summary, Mapping) and summary.get("missing"):
        # Tasks whose data could not be fetched: not a failure, but no success marker either, so
        # a rerun adds them (and only them) once their data is there.
        log.warning("[%s] finished in %.1f s without %d task(s) whose data could not be fetched: "
                    "%s (`l2vg data` says where to put it)", stage, seconds,
                    len(summary["missing"]), ", ".join(summary["missing"]))
        return {**record, "status": "ran without some data"}
    storage.write_json(
        storage.join(out, SUCCESS),
        {
            "stage": stage,
            "config_hash": digest,
            "config": fingerprint,
            "summary": summary,
            "started_at": started_at,
            "seconds": seconds,
        },
    )
    log.info("[%s] finished in %.1f s -> %s", stage, seconds, out)
    return {**record, "status": "resumed" if status == "partial" else "ran"}


def run_pipeline(
    cfg: L2VGConfig,
    *,
    serve: bool = False,
    runners: Mapping[str, StageFn] | None = None,
    overwrite: bool = False,
) -> dict:
    """generate -> train -> eval (-> serve + one request), skipping stages already done.

    ``result["ok"]`` is False when a stage reported failures (``summary["failed"]``, e.g. eval
    tasks); such a stage gets no success marker, so the next run retries it.
    Assumes Ray is initialised (``init_ray``). ``runners`` replaces stage functions by name
    (tests); by default they are ``run_generate``, ``run_train`` and ``run_eval``.
    """
    if isinstance(cfg, DictConfig):  # from Python; the CLI passes the typed, absolute config
        cfg = typed(storage.absolute_paths(cfg))
    _warn_if_multinode(cfg)
    runners = {**_default_runners(), **(runners or {})}
    started = time.time()
    records: dict[str, dict] = {}
    upstream: str | None = None
    for stage in STAGES:
        records[stage] = run_stage(cfg, stage, runners[stage], upstream_hash=upstream,
                                   overwrite=overwrite)
        upstream = records[stage]["config_hash"]
    complete = all(r["status"] != "incomplete" for r in records.values())
    result: dict[str, Any] = {
        "ok": complete,
        "stages": records,
        "artifacts": artifacts(cfg, records),
    }
    if serve:
        result["serve"] = serve_and_query(cfg)
    result["seconds"] = round(time.time() - started, 2)
    print(format_summary(result))
    return result


def serve_and_query(cfg: L2VGConfig, text: str = "What is the capital of France?") -> dict:
    """Start the Serve app, send one real POST /v1/embeddings, shut Serve down."""
    import httpx
    from ray import serve

    from l2vg_ray.serve.app import run_serve

    info = run_serve(cfg, blocking=False) or {}
    try:
        url = info.get("embeddings_url")
        if not url:
            base = f"http://{cfg.serve.host}:{cfg.serve.port}"
            prefix = str(cfg.serve.route_prefix).strip("/")
            url = "/".join(p for p in (base, prefix, "v1/embeddings") if p)
        payload = {"model": cfg.serve.model_name, "input": [text]}
        t0 = time.time()
        response = httpx.post(url, json=payload, timeout=120)
        latency = time.time() - t0
        if response.status_code != 200:
            raise RuntimeError(f"POST {url} answered {response.status_code}: {response.text}")
        vector = response.json()["data"][0]["embedding"]
        answer = {
            "url": url,
            "input": text,
            "dims": len(vector),
            "first_values": [round(float(v), 4) for v in vector[:5]],
            "latency_s": round(latency, 3),
        }
        print(f"POST {url} -> {answer['dims']} dims, first values {answer['first_values']}")
        return {**info, "request": answer}
    finally:
        serve.shutdown()


def artifacts(cfg: L2VGConfig, records: Mapping[str, dict]) -> dict[str, Any]:
    """Where the results are: data, encoder, curves, eval tables, plus other files the stages
    reported (their echoed configs left out)."""
    summaries = {stage: rec.get("summary") or {} for stage, rec in records.items()}
    train = summaries.get("train", {})
    encoder = train.get("final_dir") or (
        str(cfg.eval.model) if depends_on_upstream(cfg, "eval") else None
    )
    found: dict[str, Any] = {
        "data": stage_output(cfg, "generate"),
        "encoder": encoder,
        "curves": train.get("curves_png"),
        "train_metrics": train.get("metrics_csv"),
        "eval": stage_output(cfg, "eval"),
    }
    for stage, summary in summaries.items():
        for key, value in _paths_in(summary):
            if value not in found.values():
                found[f"{stage}.{key}"] = value
    return found


def format_summary(result: Mapping[str, Any]) -> str:
    lines = ["", "l2vg pipeline summary"]
    for stage, rec in result["stages"].items():
        took = f" in {rec['seconds']:.1f} s" if "seconds" in rec else ""
        lines.append(f"  {stage:<9} {rec['status']}{took} -> {rec['output']}")
    ev = result["stages"].get("eval", {}).get("summary") or {}
    scores = ev.get("scores") or {}
    missing = ev.get("missing") or {}
    lines += [
        f"  score     {task}: "
        f"{'no data' if task in missing else 'failed' if score is None else format(score, '.3f')}"
        for task, score in scores.items()
    ]
    if ev.get("mean_main_score") is not None:
        lines.append(f"  score     mean of {ev.get('n_ok', len(scores))} tasks: "
                     f"{ev['mean_main_score']:.3f}")
    lines.append("  artifacts:")
    lines += [f"    {k}: {v}" for k, v in result["artifacts"].items() if v is not None]
    if "serve" in result:
        req = result["serve"]["request"]
        lines.append(f"  serve: POST {req['url']} -> {req['dims']} dims {req['first_values']}")
    return "\n".join(lines)


def _default_runners() -> dict[str, StageFn]:
    def generate(cfg: L2VGConfig) -> dict:
        from l2vg_ray.generate.pipeline import run_generate

        return run_generate(cfg)

    def train(cfg: L2VGConfig, *, resume: bool = False) -> dict:
        from l2vg_ray.train.trainer import run_train

        return run_train(cfg, resume=resume)

    def evaluate(cfg: L2VGConfig) -> dict:
        from l2vg_ray.eval.runner import run_eval

        return run_eval(cfg)

    return {"generate": generate, "train": train, "eval": evaluate}


def _drop(section: Any, keys: set[str]) -> Any:
    return {k: v for k, v in section.items() if k not in keys} if isinstance(section, dict) else section


def _paths_in(summary: Mapping[str, Any], prefix: str = "") -> list[tuple[str, str]]:
    """(key, value) pairs of a summary whose values look like file or folder locations."""
    out = []
    for key, value in summary.items():
        name = f"{prefix}{key}"
        if key == "config":  # a stage's copy of the config: paths, not artifacts
            continue
        if isinstance(value, Mapping):
            out += _paths_in(value, prefix=f"{name}.")
        elif isinstance(value, str) and ("/" in value or "\\" in value) and "\n" not in value:
            out.append((name, value))
    return out


def _check_clearable(cfg: L2VGConfig, stage: str) -> None:
    """Refuse to delete a stage folder that holds the run's root or another stage's output."""
    out = stage_output(cfg, stage).rstrip("/")
    others = [stage_output(cfg, s).rstrip("/") for s in STAGES if s != stage]
    if out == str(cfg.output_dir).rstrip("/") or any(o.startswith(out + "/") for o in others):
        raise ValueError(
            f"{SPECS[stage].output_key}={out!r} holds output of another config, but it also "
            f"contains the run's root or another stage's folder, so it is not deleted. Point "
            f"{SPECS[stage].output_key} at its own folder or delete it yourself."
        )


def _has_train_checkpoint(cfg: L2VGConfig) -> bool:
    """Whether an interrupted training run left a checkpoint that ``run_train(resume=True)`` can
    continue."""
    from l2vg_ray.train.trainer import latest_run_name, storage_path

    return latest_run_name(storage_path(cfg)) is not None


def _warn_if_multinode(cfg: L2VGConfig) -> None:
    import ray

    if ray.is_initialized():
        storage.warn_if_not_shared(cfg, len([n for n in ray.nodes() if n.get("Alive")]))
