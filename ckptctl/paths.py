"""Path safety, in one place: every path a command writes is checked against every path it reads,
after resolving symlinks, before any byte is written (issue "never lose a byte").

Rules: no write path equals, contains or lies inside a source; nothing existing and non-empty is
replaced without --overwrite; --overwrite never removes a folder that holds a source (the first rule);
a destination that cannot be written (read-only filesystem, a parent that is a file, no permission)
is bad input (exit 2), found before the work starts; the bytes to write must fit the free space of
each filesystem they go to.
"""
from __future__ import annotations

import errno
import os
import shutil
from pathlib import Path

from ckptctl.errors import BadInput


def real(p: Path) -> Path:
    """The path with every symlink of its existing part resolved (the part that does not exist yet kept)."""
    return Path(os.path.realpath(os.path.abspath(p)))


def _within(inner: Path, outer: Path) -> bool:
    return inner == outer or outer in inner.parents


_NEVER = "ckptctl never writes into, over or around what it reads: choose another path"


def check_disjoint(reads: dict[str, Path], writes: dict[str, Path], why: str = _NEVER) -> None:
    """reads/writes: role ("the source", "--store" ...) -> path. One error naming both, exit 2."""
    for wrole, w in writes.items():
        rw = real(w)
        for rrole, r in reads.items():
            rr = real(r)
            if rw == rr:
                rel = "is"
            elif _within(rw, rr):
                rel = "lies inside"
            elif _within(rr, rw):
                rel = "contains"
            else:
                continue
            alias = "" if rw == Path(os.path.abspath(w)) and rr == Path(os.path.abspath(r)) else \
                f" (after resolving symlinks: {rw} vs {rr})"
            raise BadInput(f"{wrole} {w} {rel} {rrole} {r}{alias}; {why}")


def outside_links(src: Path) -> list[tuple[Path, Path]]:
    """Symlinks inside `src` that lead outside it: (link, where it leads). What they lead to is read
    too, so it is protected like the source and named in the report."""
    root, out = real(src), []
    if not Path(src).is_dir():
        return out
    for dirpath, dirs, files in os.walk(src):   # symlinked folders are listed, not entered
        for n in dirs + files:
            p = Path(dirpath) / n
            if p.is_symlink():
                t = real(p)
                if not _within(t, root):
                    out.append((p, t))
    return out


def occupied(p: Path) -> bool:
    if p.is_symlink():
        return True
    if p.is_dir():
        return any(p.iterdir())
    return p.exists()


def check_free(writes: dict[str, Path], overwrite: bool) -> None:
    """Nothing existing and non-empty is replaced without --overwrite (the checks above have already
    made sure that replacing it cannot touch a source)."""
    for role, p in writes.items():
        if occupied(p) and not overwrite:
            raise BadInput(f"{role} {p} exists and is not empty; pass --overwrite to replace it")


def check_writable(target: Path) -> None:
    """The nearest existing ancestor of `target` must be a writable folder on a writable filesystem."""
    p = Path(os.path.abspath(target))
    probe = p.parent
    while not probe.exists() and not probe.is_symlink():
        probe = probe.parent
    if not probe.is_dir():
        raise BadInput(f"cannot write {target}: {probe} is a file, not a folder")
    st = os.statvfs(probe)
    if st.f_flag & os.ST_RDONLY:
        raise BadInput(f"cannot write {target}: {probe} is on a read-only filesystem")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise BadInput(f"cannot write {target}: no write permission on {probe}")


def make_dir(p: Path, exist_ok: bool = False) -> None:
    """mkdir (with parents) whose failures are the user's to fix: exit 2 naming the path."""
    try:
        p.mkdir(parents=True, exist_ok=exist_ok)
    except FileExistsError:
        if not exist_ok:
            raise
    except OSError as e:
        raise BadInput(f"cannot create {p}: {e.strerror or e}") from None


def tree_bytes(p: Path, skip: Path | None = None) -> int:
    """Bytes of the files under p (symlinks not followed), without the folder `skip` below it."""
    p = Path(p)
    if p.is_file():
        return p.stat().st_size
    total = 0
    for dirpath, dirs, files in os.walk(p):
        if skip is not None and Path(dirpath) == Path(skip):
            dirs[:] = []
            continue
        for f in files:
            try:
                total += os.lstat(os.path.join(dirpath, f)).st_size
            except OSError:
                pass
    return total


def _existing(p: Path) -> Path:
    p = Path(os.path.abspath(p))
    while not p.exists():
        p = p.parent
    return p


def check_space(needs: dict[Path, int]) -> None:
    """needs: a path that will be written (or its parent) -> bytes. Bytes on one filesystem add up;
    each filesystem must have them free (CKPTCTL_SKIP_SPACE_CHECK=1 skips this, for the disk-full test)."""
    if os.environ.get("CKPTCTL_SKIP_SPACE_CHECK") == "1":
        return
    by_dev: dict[int, list] = {}
    for p, n in needs.items():
        e = _existing(p)
        d = by_dev.setdefault(e.stat().st_dev, [e, 0])
        d[1] += n
    from ckptctl.output import human_bytes
    for where, need in by_dev.values():
        free = shutil.disk_usage(where).free
        if need > free:
            raise BadInput(f"not enough free space on the filesystem of {where}: this convert writes "
                           f"{human_bytes(need)} ({need} bytes) there, {human_bytes(free)} ({free} bytes) are free")


def remove(p: Path) -> None:
    """Remove a file, a symlink (not what it points to) or a folder tree."""
    if p.is_symlink() or not p.is_dir():
        p.unlink(missing_ok=True)
    else:
        shutil.rmtree(p, ignore_errors=True)


def no_space_message(e: OSError, where: str | os.PathLike | None) -> str | None:
    if getattr(e, "errno", None) == errno.ENOSPC:
        return f"No space left on device writing {getattr(e, 'filename', None) or where}"
    return None


def require_checkpoint(path) -> None:
    """A path to read must exist: refused here, before a command imports torch (2-3 s), not after."""
    if not Path(path).exists():
        raise BadInput(f"no checkpoint at {path}")
