"""The digest scheme of `ckptctl digest` (issue 13): a fingerprint of a checkpoint's state that does not
depend on its parallel layout or its format. Pure: bytes in, hex strings out.

A global tensor's canonical bytes are its C-order (row-major) bytes. They are cut at fixed offsets into
blocks of `BLOCK` bytes (the last one shorter), each hashed on its own, so any process can hash any
block range of any tensor without reading the bytes before it; the tensor's hash is one hash over its
name, dtype, shape and its block hashes in order; the root is one hash over the sorted (name, hash)
pairs. SHA-256 (hashlib, OpenSSL): the same value on every machine and Python, a standard a user can
re-derive with other tools, and on CPUs with SHA extensions (x86 since Ice Lake/Zen, ARMv8) faster than
hashlib's BLAKE2b: measured here 1.1 GB/s against 0.6 GB/s per core.
"""
from __future__ import annotations

import hashlib
import json

from ckptctl.box import Box

ALGORITHM = "sha256"
BLOCK = 16 << 20            # bytes per block of canonical bytes: a multiple of every itemsize
VERSION = "ckptctl-digest-v1"


def block_hash(data) -> bytes:
    """One block's hash (`data`: any buffer of at most BLOCK bytes)."""
    return hashlib.sha256(data).digest()


class BlockHasher:
    """Hashes the canonical bytes [start, stop) of one tensor, fed in order as buffers of any size;
    `start` is a multiple of BLOCK, so the blocks cut here are the tensor's global blocks."""

    def __init__(self, start: int, stop: int):
        assert start % BLOCK == 0, start
        self.pos, self.stop = start, stop
        self.hashes: list[bytes] = []
        self._h = hashlib.sha256()
        self._in_block = 0

    def update(self, data) -> None:
        mv = memoryview(data).cast("B")
        while len(mv):
            take = min(len(mv), BLOCK - self._in_block)
            self._h.update(mv[:take])
            mv = mv[take:]
            self._in_block += take
            self.pos += take
            if self._in_block == BLOCK:
                self._close()

    def _close(self) -> None:
        self.hashes.append(self._h.digest())
        self._h, self._in_block = hashlib.sha256(), 0

    def finish(self) -> list[bytes]:
        assert self.pos == self.stop, (self.pos, self.stop)
        if self._in_block:
            self._close()
        return self.hashes


def tensor_hash(name: str, dtype: str, shape, blocks: list[bytes]) -> str:
    """The hash of one global tensor from its block hashes in order."""
    h = hashlib.sha256()
    h.update(f"{VERSION}\0tensor\0{name}\0{dtype}\0{list(map(int, shape))}\0{len(blocks)}\0".encode())
    for b in blocks:
        h.update(b)
    return h.hexdigest()


def object_hash(name: str, value) -> str:
    """The hash of a JSON-able value (canonical JSON: sorted keys, no spaces)."""
    text = json.dumps(value, sort_keys=True, separators=(",", ":"), default=repr)
    return hashlib.sha256(f"{VERSION}\0object\0{name}\0{text}".encode()).hexdigest()


def root_hash(entries: dict[str, str]) -> str:
    """The root over every entry (tensor or object name -> its hash), in sorted name order."""
    h = hashlib.sha256(f"{VERSION}\0root\0{len(entries)}\0".encode())
    for name in sorted(entries):
        h.update(f"{name}\0{entries[name]}\n".encode())
    return h.hexdigest()


def segments(nbytes: int, target: int) -> list[tuple[int, int]]:
    """[start, stop) byte ranges of about `target` bytes (whole blocks) tiling a tensor of `nbytes`."""
    step = max(1, target // BLOCK) * BLOCK
    return [(s, min(nbytes, s + step)) for s in range(0, nbytes, step)] or [(0, 0)]


def flat_boxes(shape: tuple[int, ...], start: int, stop: int) -> list[Box]:
    """Boxes whose row-major bytes, one after another, are the flat elements [start, stop) of a C-order
    array of `shape`: each box is contiguous (a range along one dim, single indices before it, whole
    dims after it), so tiling each further with row-major tiles keeps the flat order."""
    if not shape:
        return [Box((), ())] if start < stop else []
    out: list[Box] = []

    def walk(prefix: tuple[int, ...], dims: tuple[int, ...], lo: int, hi: int) -> None:
        # [lo, hi) flat within the sub-array at `prefix` of shape `dims` (non-empty range).
        inner = 1
        for d in dims[1:]:
            inner *= d
        first, last = lo // inner, (hi - 1) // inner      # indices along dims[0] touched
        if lo % inner == 0 and hi % inner == 0 or len(dims) == 1:
            out.append(Box(prefix + (first,) + (0,) * (len(dims) - 1), (1,) * len(prefix) + (last - first + 1,) + dims[1:]))
            return
        if lo % inner:                                    # a partial leading index
            walk(prefix + (first,), dims[1:], lo % inner, min(inner, hi - first * inner))
            first += 1
            if first > last:
                return
        whole_end = last if hi % inner else last + 1
        if whole_end > first:
            out.append(Box(prefix + (first,) + (0,) * (len(dims) - 1), (1,) * len(prefix) + (whole_end - first,) + dims[1:]))
        if hi % inner and last >= first:
            walk(prefix + (last,), dims[1:], 0, hi - last * inner)

    if start < stop:
        walk((), tuple(shape), start, stop)
    return out
