"""The checks `convert` runs before its first byte, and what it holds while it writes: path safety
(ckptctl.paths), the destination's lock, stale work folders of dead runs, free space, and the
signal that stops it (ckptctl.guard). One context manager, so the conversion code stays about converting.
"""
from __future__ import annotations

import os
from contextlib import contextmanager
from pathlib import Path

from ckptctl import guard, paths
from ckptctl.errors import BadInput


def write_paths(src: Path, dst: Path, to, store: Path | None, keep_store: bool) -> dict[str, Path]:
    """Every path a convert writes, by the role the error messages name."""
    dst = Path(dst)
    to_store = dst.suffix == ".zarr" and to is None
    w = {"the destination": dst, "the work folder": dst.parent / f".{dst.name}.ckptctl-work"}
    if store is not None and not to_store:
        w["--store"] = Path(store)
    if keep_store and store is None and not to_store:
        w["--keep-store's store"] = dst.with_name(dst.name + ".zarr")
    return w


def check(src: Path, dst: Path, to, store: Path | None, keep_store: bool, overwrite: bool,
          notes: list | None = None) -> dict[str, Path]:
    """Path checks, no side effects: exit 2 with one line before anything is written. Symlinks leading
    out of the source are followed, named in `notes`, and what they lead to is protected like the source."""
    if not Path(os.path.abspath(dst)).name or not str(dst).strip():
        raise BadInput(f"destination {str(dst)!r} names no folder to create")
    paths.require_checkpoint(src)
    writes = write_paths(src, dst, to, store, keep_store)
    reads = {"the source": Path(src)}
    for link, target in paths.outside_links(Path(src)):
        reads[f"the file read through the source's symlink {link},"] = target
        if notes is not None:
            notes.append(f"read {target} through the symlink {link}, which leads outside the source")
    paths.check_disjoint(reads, writes)
    outputs = [(r, w) for r, w in writes.items() if r != "the work folder"]
    for i, (ra, a) in enumerate(outputs):   # one output inside another would be replaced with it
        paths.check_disjoint({ra: a}, dict(outputs[i + 1:]), "one output would replace the other: choose another path")
    for role, p in writes.items():
        if role != "the work folder":
            paths.check_writable(p)
    paths.check_free({r: p for r, p in writes.items() if r != "the work folder"}, overwrite)
    return writes


_resume: dict[str, Path] = {}   # destination -> the work folder to reuse (--resume), set by `guarded`


def work_folder(dst: Path) -> Path:
    """The run's hidden work folder beside DST: the interrupted run's with --resume, else a new one."""
    dst = Path(dst)
    old = _resume.pop(os.path.abspath(dst), None)
    if old is not None and old.is_dir():
        return old
    import uuid
    work = dst.parent / f".{dst.name}.ckptctl-{uuid.uuid4().hex[:8]}"
    paths.make_dir(work)
    return work


@contextmanager
def guarded(src: Path, dst: Path, to, kw: dict, resume: bool = False):
    """Around one convert: yields a list the caller appends to its report's notes. Interruptions by a
    signal leave through here as `guard.Interrupted` naming the destination. `resume`: the newest work
    folder an interrupted run left is reused (ckptctl.reshard.resume), the others removed."""
    guard.refuse_under_launcher(getattr(kw.get("nodes"), "nnodes", 1))
    store, keep_store = kw.get("store"), kw.get("keep_store", False)
    notes: list[str] = []
    writes = check(src, dst, to, store, keep_store, kw.get("overwrite", False), notes)
    nodes = kw.get("nodes")
    node_rank = getattr(nodes, "node_rank", 0)
    if kw.get("dry_run"):
        yield notes
        return
    lock = None
    try:
        if node_rank == 0:
            lock = guard.DestLock(dst)
            paths.make_dir(Path(os.path.abspath(dst)).parent, exist_ok=True)
            lock.acquire()
            if lock.note:
                notes.append(lock.note)
            keep = None
            if getattr(nodes, "multi", False):
                keep = Path(os.path.abspath(dst)).parent / f".{Path(dst).name}.ckptctl-mn{nodes.master_port}"
            if resume and keep is None:
                keep = _resumable(dst, notes)
            notes += guard.remove_stale(dst, keep)
        _check_space(src, dst, writes, Path(dst).suffix == ".zarr" and to is None, getattr(nodes, "multi", False))
        yield notes
    except guard.Interrupted as e:
        e.dst = Path(dst)
        raise
    except OSError as e:
        msg = paths.no_space_message(e, dst)
        if msg:
            raise BadInput(msg) from None
        raise
    finally:
        _resume.pop(os.path.abspath(dst), None)
        if lock is not None:
            lock.release()


def _check_space(src: Path, dst: Path, writes: dict[str, Path], to_store: bool, multi: bool = False) -> None:
    """Each byte of the source is written about once to the store and once to the target (the
    target's rank files hold the same tensors); a store source is only read."""
    n = paths.tree_bytes(Path(src))
    from_store = (Path(src) / "zarr.json").is_file()
    needs: dict[Path, int] = {}
    dst_parent = Path(os.path.abspath(dst)).parent
    needs[dst_parent] = n
    if not from_store and not to_store:
        store_at = writes.get("--store", dst_parent)
        kept = multi or "--store" in writes or "--keep-store's store" in writes   # multi-node: never references
        # a hidden store references the source's bytes (ckptctl.storage.refs): metadata and the chunks that
        # are not one byte range of a source file (optimizer state) are all it writes; a kept store copies all
        needs[store_at] = needs.get(store_at, 0) + (n if kept else n // 20)   # same filesystem: added up
    paths.check_space(needs)


@contextmanager
def divergent_replicas(allow: bool, notes: list):
    """--allow-divergent-replicas: the workers (forked, or torchrun's) learn it from their environment."""
    from ckptctl.reshard.replicas import ALLOW_ENV
    if not allow:
        yield
        return
    old = os.environ.get(ALLOW_ENV)
    os.environ[ALLOW_ENV] = "1"
    try:
        yield
        notes.append("--allow-divergent-replicas: where copies of a replicated tensor differ between rank "
                     "files, the first rank file's copy was taken")
    finally:
        if old is None:
            os.environ.pop(ALLOW_ENV, None)
        else:
            os.environ[ALLOW_ENV] = old


def _resumable(dst: Path, notes: list) -> Path | None:
    """The newest stale work folder of `dst` that holds a job (called under the destination's lock)."""
    from ckptctl.reshard import resume
    found = [p for p in guard.stale_work(dst) if p.is_dir() and ".ckptctl-" in p.name and any(p.glob("job*.json"))]
    if not found:
        notes.append("--resume: no interrupted run of this destination found; converting from the start")
        return None
    work = max(found, key=lambda p: p.stat().st_mtime)
    src_n, dst_n = resume.counts(work)
    notes.append(f"--resume: reusing {work.name}: {src_n} source and {dst_n} target rank files finished "
                 "before the interruption are kept (if their job is the same and their checksums hold)")
    _resume[os.path.abspath(dst)] = work
    return work
