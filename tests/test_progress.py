"""A worker's progress file: written by a background thread (never in the copy loop, nor at a phase's end),
whole, final on close."""
import threading
import time

import pytest

import ckptctl.storage.progress as progress_mod
from ckptctl.storage.progress import Progress


@pytest.fixture
def writers(monkeypatch) -> list:
    """(thread name, text) of every progress file write, in order."""
    seen = []
    real = progress_mod.write_text

    def spy(path, text, fsync=False):
        seen.append((threading.current_thread().name, text))
        real(path, text, fsync)

    monkeypatch.setattr(progress_mod, "write_text", spy)
    return seen


def test_adds_never_write_in_the_caller_and_close_writes_the_total(tmp_path, monkeypatch, writers):
    monkeypatch.setattr(progress_mod, "_EVERY", 0.01)
    p = Progress(str(tmp_path), 3)
    for _ in range(2000):
        p.add(5)
    assert all(name == "ckptctl-progress" for name, _ in writers), writers
    p.close()
    assert (tmp_path / "progress" / "rank3").read_text() == "10000"
    assert writers[-1][1] == "10000"
    assert not p._thread


def test_force_wakes_the_writer_at_once_and_never_writes_in_the_caller(tmp_path, monkeypatch, writers):
    """A phase's end (`force`) gets its count written promptly, but by the thread: a write in the caller held
    the phase's final all-gather back by 0.4-1.0 s on a lent 16-core host (docs/performance.md)."""
    monkeypatch.setattr(progress_mod, "_EVERY", 3600.0)   # only a wake gets the thread to write
    p = Progress(str(tmp_path), 0)
    p.add(7)
    assert not (tmp_path / "progress" / "rank0").exists()
    p.add(1, force=True)
    deadline = time.monotonic() + 10
    while writers != [("ckptctl-progress", "8")] and time.monotonic() < deadline:
        time.sleep(0.01)
    assert writers == [("ckptctl-progress", "8")]
    assert (tmp_path / "progress" / "rank0").read_text() == "8"
    p.add(2)
    p.close()   # the last count, in the caller, after the thread stopped
    assert writers[-1] == ("MainThread", "10") and not p._thread


def test_no_workdir_writes_nothing():
    p = Progress(None, 0)
    p.add(3, force=True)
    p.close()
    assert p.done == 3 and p._thread is None
