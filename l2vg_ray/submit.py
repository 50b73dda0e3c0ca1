"""``l2vg submit``: send a stage or the whole pipeline to a Ray cluster as a Ray job.

    l2vg submit pipeline --address http://HEAD:8265 --config configs/paper/qwen3-4b.yaml
    l2vg submit eval --config configs/paper/qwen3-4b.yaml eval.model=teacher --no-wait

is the same as Ray's own CLI with the runtime environment spelled out:

    ray job submit --address http://HEAD:8265 --working-dir . -- \
        python jobs/pipeline.py --config configs/paper/qwen3-4b.yaml

The working directory (this repository, without virtual environments, outputs and caches) is
uploaded with the job; the job runs ``python jobs/<stage>.py`` on the head node with the image's
Python environment, plus ``cluster.pip`` requirements when the config lists any.
"""

from __future__ import annotations

import asyncio
import logging
import os
import shlex
import sys
import time
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from l2vg_ray.config import ClusterConfig, ConfigError, load_config

log = logging.getLogger(__name__)

JOB_SCRIPTS = {
    "generate": "jobs/generate.py",
    "train": "jobs/train.py",
    "eval": "jobs/evaluate.py",
    "serve": "jobs/serve.py",
    "embed": "jobs/embed.py",
    "llm2vec": "jobs/llm2vec.py",
    "pipeline": "jobs/pipeline.py",
}
# Never uploaded with the job (gitignore syntax, relative to the working dir). Ray also honours
# the repository's .gitignore.
EXCLUDES = [
    ".git",
    ".venv",
    ".venv-*",
    "outputs",
    "**/__pycache__",
    "*.egg-info",
    ".pytest_cache",
    ".ruff_cache",
    "bench/results",
]
TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")


def resolve_address(address: str | None, cfg: DictConfig) -> str:
    """``--address``, else an explicitly configured ``cluster.dashboard_address``, else an
    ``http(s)://`` ``RAY_ADDRESS`` (as `ray job submit` reads it), else the default address."""
    if address:
        return address
    configured = cfg.cluster.dashboard_address
    env = os.environ.get("RAY_ADDRESS", "")
    if configured == ClusterConfig.dashboard_address and env.startswith(("http://", "https://")):
        return env
    return configured


def build_entrypoint(
    stage: str, *, config_path: str | None, overrides: list[str], working_dir: str | Path
) -> str:
    """The shell command the job runs on the head node, e.g. ``python jobs/train.py --config X``."""
    if stage not in JOB_SCRIPTS:
        raise ConfigError(f"Cannot submit {stage!r}; choose one of {sorted(JOB_SCRIPTS)}.")
    parts = ["python", JOB_SCRIPTS[stage]]
    if config_path is not None:
        parts += ["--config", job_config_path(config_path, working_dir)]
    parts += list(overrides)
    return " ".join(shlex.quote(p) for p in parts)


def job_config_path(config_path: str, working_dir: str | Path) -> str:
    """The config path as the job sees it: relative to the uploaded working dir when inside it.

    A config outside the working dir is passed by absolute path, which the head node must see
    (the same machine or a shared mount): put experiment YAMLs under ``configs/`` instead.
    """
    config = Path(config_path).resolve()
    root = Path(working_dir).resolve()
    try:
        return config.relative_to(root).as_posix()
    except ValueError:
        log.warning(
            "Config %s lies outside the working dir %s, so it is not uploaded with the job; the "
            "head node must see it at that path. Copy it under %s/configs/ to ship it.",
            config,
            root,
            root,
        )
        return str(config)


def build_runtime_env(cfg: DictConfig, working_dir: str | Path) -> dict[str, Any]:
    """working_dir (uploaded), excludes, env_vars, and pip only when ``cluster.pip`` lists any
    (otherwise the image's environment is used as is)."""
    root = Path(working_dir).resolve()
    if not (root / "jobs").is_dir():
        raise ConfigError(
            f"--working-dir {str(root)!r} has no jobs/ folder; run `l2vg submit` from the "
            f"l2vg-ray repository or pass --working-dir PATH_TO_REPO."
        )
    env: dict[str, Any] = {"working_dir": str(root), "excludes": list(EXCLUDES)}
    if cfg.cluster.env_vars:
        env["env_vars"] = {str(k): str(v) for k, v in cfg.cluster.env_vars.items()}
    if cfg.cluster.pip:
        env["pip"] = list(cfg.cluster.pip)
    return env


def submit(
    stage: str,
    *,
    config_path: str | None,
    overrides: list[str],
    address: str | None = None,
    wait: bool = True,
    working_dir: str | Path = ".",
) -> int:
    """Submit ``python jobs/<stage>.py`` as a Ray job; returns a process exit code.

    With ``wait`` the job's logs are followed and the exit code is 0 only if the job SUCCEEDED;
    without it the job id is printed and 0 returned once the cluster accepted the job.
    """
    from ray.job_submission import JobSubmissionClient

    cfg = load_config(config_path, overrides)  # a typo fails here, not minutes later on the cluster
    entrypoint = build_entrypoint(
        stage, config_path=config_path, overrides=overrides, working_dir=working_dir
    )
    runtime_env = build_runtime_env(cfg, working_dir)
    address = resolve_address(address, cfg)
    try:
        client = JobSubmissionClient(address)
    except (ConnectionError, RuntimeError, ValueError) as e:
        print(
            f"l2vg submit: cannot reach the Ray dashboard at {address}: {e}\n"
            f"Pass --address http://HEAD:8265 (port-forward it first on Kubernetes).",
            file=sys.stderr,
        )
        return 2
    job_id = client.submit_job(
        entrypoint=entrypoint,
        runtime_env=runtime_env,
        metadata={"l2vg_stage": stage, "l2vg_config": str(config_path), "name": str(cfg.name)},
    )
    print(f"Submitted job {job_id} to {address}: {entrypoint}", flush=True)
    if not wait:
        print(job_id)
        return 0
    try:
        status = follow(client, job_id)
    except KeyboardInterrupt:
        print(
            f"\nStopped following; job {job_id} keeps running. Stop it with: "
            f"ray job stop --address {address} {job_id}",
            file=sys.stderr,
        )
        return 130
    info = client.get_job_info(job_id)
    print(f"Job {job_id} {status}" + (f": {info.message}" if info.message else ""), flush=True)
    return 0 if status == "SUCCEEDED" else 1


def follow(client: Any, job_id: str, *, poll_s: float = 2.0) -> str:
    """Stream the job's logs to stdout until it ends; returns its final status name."""

    async def tail() -> None:
        async for lines in client.tail_job_logs(job_id):
            print(lines, end="", flush=True)

    try:
        asyncio.run(tail())
    except Exception as e:  # a dropped log stream must not lose the job's status
        log.warning("Log streaming stopped (%s); polling the job status instead.", e)
    while True:
        status = str(client.get_job_status(job_id).value)
        if status in TERMINAL:
            return status
        time.sleep(poll_s)
