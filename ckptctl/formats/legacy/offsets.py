"""Where a tensor's bytes lie inside a `torch.save` file (issue 13: the reference-backed pivot).

`torch.save` writes a zip whose entries are stored, never compressed: each storage is the entry
`<archive>/data/<key>`, its raw bytes starting right after the entry's local header (30 bytes + name +
extra; torch pads `extra` to align the data). `stored_records` reads those offsets from the zip's central
directory and local headers (the zipfile module; nothing is decompressed), of a whole file or of a zip
embedded at an offset of a larger file (torch_dist's `.distcp` blobs).

A legacy rank file is loaded with `torch.load(mmap=True)`, which maps the whole file once and makes
every storage a slice of that mapping; `RankFileLocator` finds a tensor's storage in the mapping
(`/proc/self/maps`) and accepts it only where it is exactly one stored entry of the zip. Anything it
cannot prove (another OS, a storage not on an entry boundary) is None: the caller copies those bytes.
"""
from __future__ import annotations

import bisect
import io
import os
import struct
import zipfile

_LOCAL = struct.Struct("<4sHHHHHIIIHH")   # a zip local file header (30 bytes)
_LOCAL_SIG = b"PK\x03\x04"


class _Window(io.RawIOBase):
    """A read-only, seekable view of bytes [base, base + length) of an open file (an embedded zip)."""

    def __init__(self, f, base: int, length: int):
        self.f, self.base, self.length, self.pos = f, base, length, 0

    def seekable(self):
        return True

    def readable(self):
        return True

    def seek(self, off, whence=0):
        self.pos = {0: off, 1: self.pos + off, 2: self.length + off}[whence]
        return self.pos

    def tell(self):
        return self.pos

    def readinto(self, b):
        n = max(0, min(len(b), self.length - self.pos))
        data = os.pread(self.f.fileno(), n, self.base + self.pos) if n else b""
        b[:len(data)] = data
        self.pos += len(data)
        return len(data)


def stored_records(path: str, base: int = 0, length: int | None = None) -> dict[str, tuple[int, int]]:
    """Entry name -> (file offset of its data, size) for every uncompressed entry of the zip at
    [base, base + length) of `path` (the whole file by default). Not a zip, damaged, or a torch file
    written big-endian: {}."""
    out = {}
    with open(path, "rb", buffering=0) as f:
        if length is None:
            length = os.fstat(f.fileno()).st_size - base
        try:
            z = zipfile.ZipFile(io.BufferedReader(_Window(f, base, length)))
        except (zipfile.BadZipFile, OSError, ValueError):
            return {}
        with z:
            for info in z.infolist():
                if info.compress_type != zipfile.ZIP_STORED or info.compress_size != info.file_size:
                    continue
                head = os.pread(f.fileno(), _LOCAL.size, base + info.header_offset)
                if len(head) != _LOCAL.size:
                    continue
                fields = _LOCAL.unpack(head)
                if fields[0] != _LOCAL_SIG:
                    continue
                start = info.header_offset + _LOCAL.size + fields[9] + fields[10]   # + name + extra
                if start + info.file_size <= length:
                    out[info.filename] = (base + start, info.file_size)
        order = next((v for k, v in out.items() if k.endswith("/byteorder")), None)
        if order is not None and os.pread(f.fileno(), order[1], order[0]) != b"little":
            return {}   # torch.load byte-swaps a big-endian file: the bytes in memory are not the file's
    return out


def _mappings(real: str) -> list[tuple[int, int, int]]:
    """(start, end, file offset) of this process's mappings of `real`."""
    out = []
    try:
        with open("/proc/self/maps") as f:
            for line in f:
                parts = line.split(None, 5)
                if len(parts) == 6 and parts[5].rstrip("\n") == real:
                    lo, hi = (int(x, 16) for x in parts[0].split("-"))
                    out.append((lo, hi, int(parts[2], 16)))
    except OSError:
        pass
    return out


class RankFileLocator:
    """tensor -> (file, offset of its storage's first byte) for tensors of one memory-mapped rank file."""

    def __init__(self, path):
        self.real = os.path.realpath(path)
        self._records: list[tuple[int, int]] | None = None
        self._maps: list[tuple[int, int, int]] | None = None

    def __call__(self, tensor) -> tuple[str, int] | None:
        if self._records is None:
            self._records = sorted(v for k, v in stored_records(self.real).items() if "/data/" in k)
            self._starts = [r[0] for r in self._records]
        st = tensor.untyped_storage()
        ptr, nbytes = st.data_ptr(), st.nbytes()
        for attempt in range(2):   # the mapping is made by torch.load: read the map table once it exists
            if self._maps is None or attempt:
                self._maps = _mappings(self.real)
            for lo, hi, off in self._maps:
                if lo <= ptr and ptr + nbytes <= hi:
                    pos = ptr - lo + off
                    i = bisect.bisect_left(self._starts, pos)
                    # only a storage that is exactly one stored entry's data (a slice of the file mapping
                    # that torch made for that entry): then the file holds these bytes at `pos`
                    if i < len(self._records) and self._records[i][0] == pos and nbytes <= self._records[i][1]:
                        return self.real, pos
                    return None
        return None
