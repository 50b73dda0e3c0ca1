"""Connecting to Ray. Only the CLI and the jobs call this (library code never calls ray.init)."""

from __future__ import annotations

import logging
import os

log = logging.getLogger(__name__)


def init_ray(cluster_cfg, **kwargs) -> None:
    """Connect to ``cluster.address``, else RAY_ADDRESS (inside a Ray job), else start locally."""
    import ray

    if ray.is_initialized():
        return
    address = cluster_cfg.address or os.environ.get("RAY_ADDRESS")
    # Variables already in this process's environment are left out: inside a Ray job the job's
    # runtime_env set them (`l2vg submit` passes cluster.env_vars there), and ray.init rejects a
    # runtime_env that repeats a key of the job's.
    env_vars = {
        str(k): str(v) for k, v in (cluster_cfg.env_vars or {}).items() if os.environ.get(k) != str(v)
    }
    runtime_env = {"env_vars": env_vars} if env_vars else None
    if address:
        log.info("Connecting to the Ray cluster at %s", address)
        ray.init(address=address, runtime_env=runtime_env, **kwargs)
    else:
        log.info("Starting a local Ray cluster in-process (num_cpus=%s)", cluster_cfg.num_cpus)
        ray.init(
            address="local",
            num_cpus=cluster_cfg.num_cpus,
            include_dashboard=False,
            runtime_env=runtime_env,
            **kwargs,
        )
