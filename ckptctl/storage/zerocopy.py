"""Target phase without copies: a block of a target tensor that is a run of whole referenced chunks
(ckptctl.storage.refs) is written straight from a read-only mapping of the source files.

`Store.read` copies every chunk twice before the file write copies it a third time (pread into a buffer,
the buffer into the block tensor where pieces meet, the block into the page cache). When a target block's
bytes in C order are whole store chunks one after the other (the usual case: the planner cuts chunks as
slabs of the source pieces, and a target row block is a slab of the same tensor), `segments` returns
them as read-only arrays on the source file's mapping, each checked against its recorded crc32c (the same
check `Refs.read` does), and the writer hands them to `write` directly: the bytes are read once for the
checksums and copied once, by the kernel, into the target file. The mapped pages are dropped after each
segment (`Segment.release`), so they do not stay in the worker's RSS (`--max-memory`).
Anything else (materialized chunks, pieces side by side along a trailing dimension, partial chunks)
returns None and takes `Store.read` as before: the bytes written are the same either way.
"""
from __future__ import annotations

import itertools
import mmap
import os

import google_crc32c
import numpy as np

from ckptctl.box import Box
from ckptctl.errors import BadInput
from ckptctl.storage.crcs import combine
from ckptctl.storage.refs import chunk_key

PAGE = mmap.PAGESIZE


class Segment:
    """`nbytes` bytes of a source file (`view`, a read-only uint8 array on its mapping), their crc32c, and how to drop their pages."""

    __slots__ = ("view", "crc32c", "_map", "_off")

    def __init__(self, view: np.ndarray, crc: int, m: mmap.mmap, off: int):
        self.view, self.crc32c, self._map, self._off = view, crc, m, off

    @property
    def nbytes(self) -> int:
        return self.view.nbytes

    def release(self, nbytes: int | None = None) -> None:
        end = self._off + (self.view.nbytes if nbytes is None else nbytes)
        lo, hi = -(-self._off // PAGE) * PAGE, end // PAGE * PAGE
        if hi > lo:
            self._map.madvise(mmap.MADV_DONTNEED, lo, hi - lo)


class _Maps:
    """Read-only mappings of the source files a worker reads (one each, kept for the phase)."""

    def __init__(self):
        self.maps: dict[str, mmap.mmap] = {}
        self.checked: set = set()   # (path, offset) of chunks whose crc32c matched

    def get(self, path: str) -> mmap.mmap:
        m = self.maps.get(path)
        if m is None:
            try:
                fd = os.open(path, os.O_RDONLY)
            except OSError as e:
                raise BadInput(f"{path}: cannot read the source file ({e.strerror}); it was removed or "
                               "changed during the conversion") from None
            try:
                m = self.maps[path] = mmap.mmap(fd, 0, access=mmap.ACCESS_READ)
            except (OSError, ValueError) as e:   # an empty file cannot be mapped: truncated since the source phase
                raise BadInput(f"{path}: cannot map the source file ({e}); it was truncated or changed during "
                               "the conversion") from None
            finally:
                os.close(fd)
            _test_truncate(path)
        return m


def _test_truncate(path: str) -> None:
    """Fault injection for the tests: CKPTCTL_TEST_TRUNCATE_MAPPED=1 empties a source file right after this
    worker mapped it (as another process truncating it during the target phase would): the next read of
    the mapping is a SIGBUS, which the launcher reports as a changed source (`launch.changed_source`)."""
    if os.environ.get("CKPTCTL_TEST_TRUNCATE_MAPPED") == "1":
        os.truncate(path, 0)


CHECK_STEP = 64 << 20


def _check_crc(m: mmap.mmap, off: int, n: int) -> int:
    """crc32c of n mapped bytes at off, read in steps whose pages are dropped after (RSS stays small)."""
    crc = 0
    for pos in range(off, off + n, CHECK_STEP):
        step = min(CHECK_STEP, off + n - pos)
        crc = google_crc32c.extend(crc, np.frombuffer(m, np.uint8, step, pos))   # read-only, no copy
        Segment(None, 0, m, pos).release(step)
    return crc


def _maps(store) -> _Maps:
    m = getattr(store, "_zerocopy_maps", None)
    if m is None:
        m = store._zerocopy_maps = _Maps()
    return m


def slab(sizes: tuple, outer: tuple) -> bool:
    """Is a box of `sizes` a contiguous byte range of an enclosing box of `outer` (C order)? True when
    some dim j has extent 1 on every dim before it and the whole outer extent on every dim after it."""
    j = next((d for d, c in enumerate(sizes) if c != 1), len(sizes) - 1)
    return all(c == s for c, s in zip(sizes[j + 1:], outer[j + 1:]))


def _referenced(store, name: str, box: Box):
    """(refs, array) when the store references source bytes and `box` is a non-empty region inside the raw
    array `name`; else None (the caller falls back to an ordinary store read)."""
    refs = store.refs
    if not refs or not box.sizes or 0 in box.sizes:
        return None
    a = store.array(name)
    if not a.raw or any(o + s > n for o, s, n in zip(box.offsets, box.sizes, a.shape)):
        return None
    return refs, a


def segments(store, name: str, box: Box) -> list[Segment] | None:
    """The bytes of `box` of array `name` in C order as consecutive byte ranges of referenced chunks, or
    None. Each chunk the box touches must give it one contiguous part of the chunk, and the parts must
    follow one another in the box; a chunk is checked whole against its crc32c once per worker."""
    found = _referenced(store, name, box)
    if found is None:
        return None
    refs, a = found
    ranges = [range(o // c, (o + s - 1) // c + 1) for o, s, c in zip(box.offsets, box.sizes, a.chunks)]
    strides, acc = [], a.dtype.itemsize
    for c in reversed(a.chunks):
        strides.append(acc)
        acc *= c
    strides.reverse()
    parts = []
    for idx in itertools.product(*ranges):
        lo = [max(o, i * c) for o, i, c in zip(box.offsets, idx, a.chunks)]
        sizes = tuple(min(o + s, (i + 1) * c) - l for o, s, i, c, l in zip(box.offsets, box.sizes, idx, a.chunks, lo))
        if not (slab(sizes, a.chunks) and slab(sizes, box.sizes)):
            return None   # the box's bytes are not runs of chunk bytes: Store.read gathers them
        e = refs.entries.get(chunk_key(a.name, a.sep, idx))
        if e is None:
            return None   # a materialized chunk in the box: Store.read takes the whole block
        start = sum((l - i * c) * st for l, i, c, st in zip(lo, idx, a.chunks, strides))
        n = a.dtype.itemsize
        for s in sizes:
            n *= s
        parts.append((idx, e, start, n))
    maps, out = _maps(store), []
    for idx, e, start, length in parts:
        m, off = _mapped(maps, a, idx, e), e[1]
        part = _verify(maps, m, a, idx, e, start, length)
        view = np.frombuffer(m, np.uint8, length, off + start)
        out.append(Segment(view, part if part is not None else int(google_crc32c.value(view)), m, off + start))
    return out


def _mapped(maps: _Maps, a, idx: tuple, e: list) -> mmap.mmap:
    """The mapping of the source file of chunk `idx`'s reference `e` = [path, offset, nbytes, crc32c], once the
    reference is a whole chunk and the file still holds it."""
    path, off, n, _ = e
    if n != a.chunk_nbytes:
        raise BadInput(f"{path}: reference of store {a.where(idx)} is {n} bytes, the chunk {a.chunk_nbytes}")
    m = maps.get(path)
    if off + n > len(m):
        raise BadInput(f"{path}: ends before byte {off + n}; the source file was truncated "
                       "during the conversion")
    return m


def _verify(maps: _Maps, m: mmap.mmap, a, idx: tuple, e: list, start: int, length: int) -> int | None:
    """Check a chunk against its crc32c once per worker (the first time, in three ranges: before, the part
    [start, start + length) and after, combined). Returns the part's crc32c when it came out of the check."""
    path, off, n, crc = e
    if (path, off) in maps.checked:
        return crc if length == n else None
    cuts = [off, off + start, off + start + length, off + n]
    crcs = [_check_crc(m, lo, hi - lo) for lo, hi in zip(cuts, cuts[1:])]
    whole = combine(combine(crcs[0], crcs[1], length), crcs[2], cuts[3] - cuts[2])
    if whole != crc:
        raise BadInput(f"{path}: bytes {off}..{off + n} ({a.where(idx)}) fail their crc32c: the source "
                       "file changed since the source phase read it")
    maps.checked.add((path, off))
    return crcs[1]


def gather(store, name: str, box: Box):
    """`Store.read(name, box)` when every chunk the box touches is referenced: each chunk's part copied once,
    straight from the source mapping into the block (no read buffer), the chunk checked once per worker.
    None when some chunk is not a reference."""
    from ckptctl.core.dtypes import chunk_grid
    from ckptctl.store import from_numpy
    found = _referenced(store, name, box)
    if found is None:
        return None
    refs, a = found
    grid = list(chunk_grid(a.shape, a.chunks, box.offsets, box.sizes))
    entries = [refs.entries.get(chunk_key(a.name, a.sep, g[0])) for g in grid]
    if any(e is None for e in entries):
        return None
    maps, out = _maps(store), np.empty(box.sizes, a.dtype)
    for (idx, box_sl, chunk_sl, _), e in zip(grid, entries):
        _, off, n, _ = e
        m = _mapped(maps, a, idx, e)
        _verify(maps, m, a, idx, e, 0, n)
        out[box_sl] = np.frombuffer(m, a.dtype, n // a.dtype.itemsize, off).reshape(a.chunks)[chunk_sl]
        Segment(None, 0, m, off).release(n)
    return from_numpy(out, a.attrs["torch_dtype"])
