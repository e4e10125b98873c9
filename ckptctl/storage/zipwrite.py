"""Filling a torch zip's reserved records in place (`save_streaming`'s second half), at the speed of the
file system: one `pwrite` per block or source segment (no Python-level buffering, no seeks), CRC-32 by
`ckptctl.storage.crcs.crc32` (ISA-L when installed), and the crc32c of every record tracked on the way so
that the finished file's crc32c (the `--resume` mark) comes from the records' checksums and a read of the
few bytes between them, not from reading the file again.
"""
from __future__ import annotations

import os

import google_crc32c
import numpy as np
import torch

from ckptctl.storage.crcs import combine, crc32

READ_BLOCK = 16 << 20


def as_bytes(block) -> np.ndarray | bytes:
    """A block handed to `write` (tensor, array or bytes) as C-order bytes (a view when it can be)."""
    if isinstance(block, torch.Tensor):
        t = block.contiguous()
        return t.view(torch.uint8).numpy().reshape(-1) if t.numel() else b""
    if isinstance(block, np.ndarray):
        return np.ascontiguousarray(block).view(np.uint8).reshape(-1)
    return block


def pwrite_all(fd: int, data, offset: int) -> None:
    view, done = memoryview(data).cast("B"), 0
    while done < len(view):
        done += os.pwrite(fd, view[done:], offset + done)


class RecordFill:
    """The `write` callback of one reserved record starting at `offset`: blocks (tensor / array / bytes)
    or lists of `ckptctl.storage.zerocopy.Segment`s, in order."""

    def __init__(self, fd: int, offset: int):
        self.fd, self.offset = fd, offset
        self.n = self.crc = self.crc32c = 0

    def __call__(self, block) -> None:
        if isinstance(block, list):
            for seg in block:
                self._put(seg.view, seg.crc32c)   # its crc32c was just checked against the source's
                seg.release()
            return
        data = as_bytes(block)
        self._put(data, google_crc32c.value(data) if len(data) else 0)

    def _put(self, data, c32c: int) -> None:
        n = data.nbytes if isinstance(data, np.ndarray) else len(data)
        if not n:
            return
        self.crc = crc32(data, self.crc)
        self.crc32c = combine(self.crc32c, c32c, n)
        pwrite_all(self.fd, data, self.offset + self.n)
        self.n += n


def file_crc32c(fd: int, size: int, known: list[tuple[int, int, int]]) -> int:
    """crc32c of a whole file whose ranges (offset, length, crc32c) `known` are checksummed already: the
    bytes between them are read (headers, the pickle, small records), the rest combined."""
    crc, pos = 0, 0
    for off, n, c in sorted(known) + [(size, 0, 0)]:
        while pos < off:
            part = os.pread(fd, min(READ_BLOCK, off - pos), pos)
            if not part:
                raise OSError(f"file ends at {pos}, expected {size} bytes")
            crc = google_crc32c.extend(crc, part)
            pos += len(part)
        if n:
            crc = combine(crc, c, n)
            pos = off + n
    return crc
