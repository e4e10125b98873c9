"""The one commit helper (ckptctl/storage/commit.py): a file or folder appears whole or not at all."""
from __future__ import annotations

import pytest

from ckptctl.storage.commit import commit_dir, folder_beside, write_beside, write_text


def test_write_beside_replaces_only_on_success(tmp_path):
    p = tmp_path / "f.bin"
    p.write_bytes(b"old")
    with pytest.raises(RuntimeError):
        with write_beside(p) as f:
            f.write(b"half")
            raise RuntimeError("killed mid-write")
    assert p.read_bytes() == b"old" and sorted(x.name for x in tmp_path.iterdir()) == ["f.bin"]   # no partial left
    with write_beside(p) as f:
        f.write(b"new")
    assert p.read_bytes() == b"new" and sorted(x.name for x in tmp_path.iterdir()) == ["f.bin"]
    write_text(tmp_path / "t.json", "{}")
    assert (tmp_path / "t.json").read_text() == "{}"


def test_folder_beside_commits_whole_or_removes(tmp_path):
    dst = tmp_path / "out"
    with pytest.raises(ValueError):
        with folder_beside(dst) as tmp:
            tmp.mkdir()
            (tmp / "a").write_text("1")
            raise ValueError("bad input found late")
    assert list(tmp_path.iterdir()) == []
    with folder_beside(dst) as tmp:
        tmp.mkdir()
        (tmp / "a").write_text("2")
    assert (dst / "a").read_text() == "2" and [x.name for x in tmp_path.iterdir()] == ["out"]


def test_commit_dir_replaces_an_existing_destination(tmp_path):
    dst, new = tmp_path / "dst", tmp_path / "new"
    dst.mkdir()
    (dst / "old").write_text("x")
    new.mkdir()
    (new / "fresh").write_text("y")
    commit_dir(new, dst)
    assert [x.name for x in dst.iterdir()] == ["fresh"] and [x.name for x in tmp_path.iterdir()] == ["dst"]
