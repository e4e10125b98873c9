"""A worker's progress file: written by a background thread (never in the copy loop), whole, final on close."""
import threading

import ckptctl.storage.progress as progress_mod
from ckptctl.storage.progress import Progress


def test_adds_never_write_in_the_caller_and_close_writes_the_total(tmp_path, monkeypatch):
    writers = []
    real = progress_mod.write_text

    def spy(path, text, fsync=False):
        writers.append((threading.current_thread().name, text))
        real(path, text, fsync)

    monkeypatch.setattr(progress_mod, "write_text", spy)
    monkeypatch.setattr(progress_mod, "_EVERY", 0.01)
    p = Progress(str(tmp_path), 3)
    for _ in range(2000):
        p.add(5)
    assert all(name == "ckptctl-progress" for name, _ in writers), writers
    p.close()
    assert (tmp_path / "progress" / "rank3").read_text() == "10000"
    assert writers[-1][1] == "10000"
    assert not p._thread


def test_force_writes_at_once_in_the_caller(tmp_path, monkeypatch):
    monkeypatch.setattr(progress_mod, "_EVERY", 3600.0)   # the thread never gets a turn
    p = Progress(str(tmp_path), 0)
    p.add(7)
    assert not (tmp_path / "progress" / "rank0").exists()
    p.add(1, force=True)
    assert (tmp_path / "progress" / "rank0").read_text() == "8"
    p.close()


def test_no_workdir_writes_nothing():
    p = Progress(None, 0)
    p.add(3, force=True)
    p.close()
    assert p.done == 3 and p._thread is None
