"""`convert --resume`: what a killed run finished is kept. Each worker marks a source rank file done
(its pieces and objects are in the store, every chunk with its crc32c) and a target rank file done (the
crc32c of every file it wrote), in `WORK/done/`. A run that reuses that work folder skips the marked
files whose outputs are still intact and redoes the rest; the plan is deterministic, so the result is
byte-identical to an uninterrupted run. A fresh work folder has no marks: nothing changes there.
"""
from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import google_crc32c

from ckptctl.storage.commit import write_text   # once, not per mark: a mark should take as little time as it can


def _dir(job) -> Path:
    return Path(job.workdir) / "done"


def keep_store(job) -> bool:
    """The store of an interrupted run is reused (not re-created) when some source file was finished."""
    d = _dir(job)
    return d.is_dir() and any(d.glob("source-*.json")) and (Path(job.store) / "zarr.json").is_file()


def source_done(job, i: int) -> dict | None:
    """The object encodings of source file i if a previous run finished it, else None."""
    try:
        return json.loads((_dir(job) / f"source-{i}.json").read_text())["encodings"]
    except (OSError, ValueError, KeyError):
        return None


def mark_source(job, i: int, encodings: dict) -> None:
    _write(job, f"source-{i}", {"encodings": encodings})
    _test_kill("source")


def _crc_file(p: Path) -> int:
    crc = 0
    with open(p, "rb") as f:
        while chunk := f.read(16 << 20):
            crc = google_crc32c.extend(crc, chunk)
    return crc


def target_done(job, i: int) -> bool:
    """True if target file i was finished by a previous run and every file it wrote is intact."""
    try:
        files = json.loads((_dir(job) / f"target-{i}.json").read_text())["files"]
    except (OSError, ValueError, KeyError):
        return False
    try:
        return all(_crc_file(Path(p)) == c for p, c in files.items())
    except OSError:
        return False


def mark_target(job, i: int, folder: Path, known: dict | None = None) -> None:
    """`known`: {str(path): crc32c} of files whose checksum the writer has already (not read again)."""
    known = known or {}
    files = {str(p): known[str(p)] if str(p) in known else _crc_file(p)
             for p in sorted(Path(folder).rglob("*")) if p.is_file()}
    _write(job, f"target-{i}", {"files": files})
    _test_kill("target")


def _write(job, name: str, doc: dict) -> None:
    d = _dir(job)
    d.mkdir(parents=True, exist_ok=True)
    write_text(d / f"{name}.json", json.dumps(doc))   # a mark is whole or absent


def counts(workdir: Path) -> tuple[int, int]:
    d = Path(workdir) / "done"
    return len(list(d.glob("source-*.json"))), len(list(d.glob("target-*.json")))


def _test_kill(phase: str) -> None:
    """Fault injection for the tests: CKPTCTL_TEST_KILL_AFTER=PHASE:N kills the CLI (SIGKILL, as an
    OOM killer or a node failure would) and so this worker, after its N-th file of that phase."""
    want = os.environ.get("CKPTCTL_TEST_KILL_AFTER", "")
    if not want.startswith(phase + ":"):
        return
    _done_here[phase] = _done_here.get(phase, 0) + 1
    if _done_here[phase] >= int(want.split(":")[1]):
        os.kill(os.getppid(), signal.SIGKILL)
        os.kill(os.getpid(), signal.SIGKILL)


_done_here: dict[str, int] = {}
