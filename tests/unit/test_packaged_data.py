from __future__ import annotations

import io
import tarfile
import zipfile

import pytest

from l2vg_ray.packaged_data import extract_member, extract_members, read_member


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
