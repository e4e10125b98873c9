"""The one way ckptctl makes a file or folder appear: write beside it under a unique partial name, fsync,
rename into place; the partial is removed on any failure, so a reader sees the old state or the whole new
one, never half (zarr's `_atomic_write`, DCP's `.metadata` written last, orbax's TemporaryPath)."""
from __future__ import annotations

import os
import uuid
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def write_beside(path: Path, mode: str = "wb", fsync: bool = True):
    """`with write_beside(p) as f: f.write(...)`: `p` is replaced only when the block finishes."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.partial-{uuid.uuid4().hex[:8]}")
    try:
        with open(tmp, mode) as f:
            yield f
            f.flush()
            if fsync:
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_text(path: Path, text: str, fsync: bool = False) -> None:
    """A small file replaced whole (progress counters, marks, JSON metadata)."""
    with write_beside(path, "w", fsync) as f:
        f.write(text)


def commit_dir(tmp: Path, dst: Path) -> None:
    """Rename a finished folder into place: the destination appears only when complete. An existing
    destination (--overwrite) is moved aside first and removed after, file or symlink included."""
    tmp, dst = Path(tmp), Path(dst)
    from ckptctl.guard import deferred
    with deferred():   # a signal waits for the renames: between them the old DST exists only as .old-*
        if dst.exists() or dst.is_symlink():
            from ckptctl.paths import remove
            old = dst.with_name(f".{dst.name}.old-{uuid.uuid4().hex[:8]}")
            dst.rename(old)
            tmp.rename(dst)
            remove(old)   # a file or a symlink too (rmtree would leave those behind)
        else:
            tmp.rename(dst)


@contextmanager
def folder_beside(dst: Path, tag: str = "ckptctl"):
    """A hidden sibling folder to build `dst` in; committed with `commit_dir` on success, removed on failure."""
    import shutil
    dst = Path(dst)
    tmp = dst.with_name(f".{dst.name}.{tag}-{uuid.uuid4().hex[:8]}")
    try:
        yield tmp
        if tmp.exists():
            commit_dir(tmp, dst)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
