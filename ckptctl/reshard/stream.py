"""Streaming under a memory budget: tensors move in row blocks, never whole (issue 5).

Source side: a rank file is memory-mapped; each piece goes to the store in blocks of whole chunk rows,
and the mapped pages of a block are dropped from the process afterwards (`release_pages`), so a
worker's RSS stays at its baseline plus a few blocks whatever the tensor size.

Target side: `torch.save` needs every storage in memory. `save_streaming` instead writes the same
zip container torch writes (through torch's own `PyTorchFileWriter`): the pickle and the small
tensors first, every large tensor's record reserved (`write_record_metadata`, as
`torch.serialization.skip_data` does), then the reserved records are filled in place, block by block,
from the store, and each record's CRC-32 is patched into the zip headers. `torch.load` (with or
without mmap) reads the result like any `torch.save` file.
"""
from __future__ import annotations

import ctypes
import mmap
import os
import struct
import zipfile
import zlib
from collections import OrderedDict
from pathlib import Path

import numpy as np
import torch

from ckptctl.box import Box

DEFAULT_MAX_MEMORY = 2 << 30      # bytes per worker (RSS), when --max-memory is not given
MIN_BLOCK = 1 << 20


def parse_size(text: str | int | None) -> int | None:
    """'2G', '512M', '1.5GiB', '1000000' -> bytes (powers of 1024)."""
    if text is None or isinstance(text, int):
        return text
    s = str(text).strip().upper().removesuffix("B").removesuffix("I")
    mult = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}.get(s[-1:], 1)
    num = s[:-1] if s[-1:] in "KMGT" else s
    try:
        return int(float(num) * mult)
    except ValueError:
        from ckptctl.errors import BadInput
        raise BadInput(f"--max-memory: expected a size like 2G or 512M, got {text!r}") from None


def rss_bytes() -> int:
    """This process's resident set size now."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * mmap.PAGESIZE
    except OSError:
        return 0


def fixed_mmap_threshold(nbytes: int = 1 << 20) -> None:
    """Blocks of at least `nbytes` always get their own mmap from glibc, and go back to the system when freed.

    glibc raises its mmap threshold each time a large block is freed (up to 32 MiB), after which blocks of
    that size come from the heap and stay resident when freed: measured, verify under a 384 MiB budget
    peaked at 356 MiB or at 475 MiB from one run to the next. Setting the threshold fixes it.
    """
    try:
        import ctypes
        ctypes.CDLL("libc.so.6").mallopt(-3, nbytes)   # M_MMAP_THRESHOLD (also ends the dynamic adjustment)
    except (OSError, AttributeError):
        pass                                           # not glibc: nothing to pin


class Budget:
    """A worker's memory budget: the block size is what is left after the baseline, split in parts.

    One block of a tensor is alive at a time, plus Zarr's encode/decode buffers of the same size and
    chunk-sized overhang at the block's edges: `parts` = 4 keeps the sum under the budget.
    """

    def __init__(self, max_bytes: int | None, parts: int = 4):
        self.max_bytes = max_bytes or DEFAULT_MAX_MEMORY
        fixed_mmap_threshold()
        self.baseline = rss_bytes()
        self.block = max(MIN_BLOCK, (self.max_bytes - self.baseline) // parts)


def row_blocks(rows: int, row_bytes: int, limit: int, align: int = 1) -> list[tuple[int, int]]:
    """[r0, r1) ranges along dim 0 of at most `limit` bytes each (at least `align` rows), aligned."""
    if rows <= 0:
        return [(0, rows)]
    n = max(1, limit // max(1, row_bytes))
    n = max(align, n // align * align)
    return [(r, min(rows, r + n)) for r in range(0, rows, n)]


def sub_piece(p, lbox: Box):
    """The part of piece `p` inside local box `lbox`: (local box, global box) or None."""
    inter = p.local.intersect(lbox)
    if inter is None:
        return None
    lead = len(p.gbox.sizes) - len(p.local.sizes)
    offs = tuple(p.gbox.offsets[:lead]) + tuple(g + i - l for g, i, l in
                                                 zip(p.gbox.offsets[lead:], inter.offsets, p.local.offsets))
    return inter, Box(offs, tuple(p.gbox.sizes[:lead]) + inter.sizes)


# --- source side: drop mapped pages once a block is in the store ---------------------------------

_libc = None


def release_pages(t: torch.Tensor) -> None:
    """madvise(MADV_DONTNEED) the whole pages under a tensor that views a read-only file mapping.

    Only for tensors of a memory-mapped rank file (MAP_PRIVATE, never written): the pages leave this
    process's RSS and stay in the page cache; touching them again faults them back in from the file.
    """
    global _libc
    if t.numel() == 0:
        return
    if _libc is None:
        _libc = ctypes.CDLL(None, use_errno=True)
        _libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    start = t.data_ptr()
    end = start + t.numel() * t.element_size() if t.is_contiguous() else _span_end(t)
    page = mmap.PAGESIZE
    lo, hi = -(-start // page) * page, end // page * page
    if hi > lo:
        _libc.madvise(lo, hi - lo, 4)   # MADV_DONTNEED


def put_rows(store, p, part: torch.Tensor, block: int, progress, mapped: bool) -> None:
    """One source piece (`p`: array, gbox, local) into the store in blocks of whole chunk rows of at most
    `block` bytes, each block's mapped pages dropped once written when `mapped` (`release_pages`)."""
    lead = len(p.gbox.sizes) - len(p.local.sizes)
    if part.dim() == 0:
        store.write(p.array, p.gbox, part)
        if progress is not None:
            progress.add(part.element_size())
        return
    row = part[0].numel() * part.element_size()
    align = store.array(p.array).chunks[lead]
    for r0, r1 in row_blocks(part.shape[0], row, block, align):
        sub = part[r0:r1]
        offs, sizes = list(p.gbox.offsets), list(p.gbox.sizes)
        offs[lead] += r0
        sizes[lead] = r1 - r0
        store.write(p.array, Box(tuple(offs), tuple(sizes)), sub)
        if mapped:
            release_pages(sub)
        if progress is not None:
            progress.add(sub.numel() * sub.element_size())


def _span_end(t: torch.Tensor) -> int:
    last = sum((s - 1) * st for s, st in zip(t.shape, t.stride()))
    return t.data_ptr() + (last + 1) * t.element_size()


# --- target side: a torch.save-compatible file written block by block ----------------------------

class LazyTensor:
    """A tensor of a target file that is not in memory: shape, dtype and a `fill(write)` callback that
    produces its bytes in row-major order."""

    def __init__(self, shape, dtype: torch.dtype, fill):
        self.shape, self.dtype, self.fill = tuple(shape), dtype, fill

    @property
    def nbytes(self) -> int:
        n = torch.empty((), dtype=self.dtype).element_size()
        for s in self.shape:
            n *= s
        return n


class _LazyStorage:
    def __init__(self, lazy: LazyTensor):
        self.lazy = lazy


def _rebuild_args(lazy: LazyTensor):
    stride, acc = [], 1
    for s in reversed(lazy.shape):
        stride.append(acc)
        acc *= s
    return (_LazyStorage(lazy), 0, lazy.shape, tuple(reversed(stride)), False, OrderedDict())


def _pickler_class(pure: bool):
    """The C pickler, or the pure-Python one of ckptctl.storage.pickles when Megatron stand-ins
    must be written back under their own names."""
    import pickle

    from ckptctl.storage.pickles import _Pickler

    class StreamPickler(_Pickler if pure else pickle.Pickler):
        """torch.save's pickling (storages as persistent ids), plus LazyTensor placeholders."""

        def __init__(self, file, records):
            super().__init__(file, protocol=2)
            self.records, self.ids = records, {}

        def reducer_override(self, obj):
            if isinstance(obj, LazyTensor):
                return (torch._utils._rebuild_tensor_v2, _rebuild_args(obj))
            return _Pickler.reducer_override(self, obj) if pure else NotImplemented

        def persistent_id(self, obj):
            if isinstance(obj, _LazyStorage):
                key = str(len(self.records))
                self.records.append((key, obj.lazy))
                lz = obj.lazy
                return ("storage", getattr(torch, _storage_type(lz.dtype)), key, "cpu", lz.nbytes // _itemsize(lz.dtype))
            if isinstance(obj, torch.storage.TypedStorage):
                storage = obj._untyped_storage
                if storage._cdata not in self.ids:
                    self.ids[storage._cdata] = str(len(self.records))
                    self.records.append((self.ids[storage._cdata], storage))
                return ("storage", getattr(torch, obj._pickle_storage_type()), self.ids[storage._cdata],
                        "cpu", obj._size())
            if torch.is_storage(obj):
                if obj._cdata not in self.ids:
                    self.ids[obj._cdata] = str(len(self.records))
                    self.records.append((self.ids[obj._cdata], obj))
                return ("storage", torch.UntypedStorage, self.ids[obj._cdata], "cpu", obj.nbytes())
            return None

    return StreamPickler


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def _storage_type(dtype: torch.dtype) -> str:
    return torch.storage._dtype_to_storage_type_map()[dtype]


def save_streaming(obj, path: Path, sums: dict | None = None, exact: bool = False) -> int:
    """Write `obj` (which may hold LazyTensors) as torch.save would. Returns bytes of lazy data written;
    `sums`, if given, gets {str(path): crc32c of the whole file} (without reading the file again);
    `exact`: the file's bytes are torch.save's too (`finish_exact`), not only what torch.load reads."""
    path = Path(path)
    archive, lazies = write_skeleton(obj, path)
    if not lazies:
        return 0
    from ckptctl.storage.zipwrite import RecordFill
    filled = []
    fd = os.open(path, os.O_RDWR)
    try:
        for name, lz, off in lazies:
            fill = RecordFill(fd, off)
            lz.fill(fill)
            if fill.n != lz.nbytes:
                raise RuntimeError(f"{path}: {name} got {fill.n} bytes, expected {lz.nbytes}")
            filled.append((name, off, fill.n, fill.crc, fill.crc32c))
    finally:
        os.close(fd)
    finish_file(path, archive, filled, sums, exact)
    return sum(f[2] for f in filled)


def write_skeleton(obj, path: Path) -> tuple[str, list]:
    """The zip torch.save would write, with every LazyTensor's record reserved (not filled, CRC 0), by
    torch's own writer: (archive name, [(record name, LazyTensor, offset of its data)])."""
    import io
    path = Path(path)
    records: list = []
    buf = io.BytesIO()
    from ckptctl.storage.pickles import _with_stand_ins
    _pickler_class(_with_stand_ins(obj))(buf, records).dump(obj)
    data = buf.getvalue()
    w = torch._C.PyTorchFileWriter(str(path), True, 64)
    w.write_record("data.pkl", data, len(data))
    w.write_record(".format_version", "1", 1)
    w.write_record(".storage_alignment", "64", 2)
    w.write_record("byteorder", "little", 6)
    lazies = []
    for key, rec in records:
        name = f"data/{key}"
        if isinstance(rec, LazyTensor):
            w.write_record_metadata(name, rec.nbytes)
            lazies.append((name, rec))
        else:
            w.write_record(name, rec, rec.nbytes())
    w.write_end_of_file()
    archive = w.archive_name()
    del w
    if not lazies:
        return archive, []
    r = torch._C.PyTorchFileReader(str(path))
    where = {name: r.get_record_offset(name) for name, _ in lazies}
    del r
    return archive, [(name, lz, where[name]) for name, lz in lazies]


def finish_file(path: Path, archive: str, filled: list, sums: dict | None = None, exact: bool = False) -> None:
    """Each filled record's CRC-32 into the zip headers; `filled`: [(name, offset, nbytes, crc32, crc32c)].
    `sums`: gets {str(path): the whole file's crc32c}, combined from the records'. `exact`: `finish_exact`."""
    from ckptctl.storage.zipwrite import file_crc32c
    if exact:
        finish_exact(path, archive, filled)
    else:
        with open(path, "r+b") as f:
            _patch_crcs(f, {f"{archive}/{name}": crc for name, _, _, crc, _ in filled})
    if sums is not None:   # ckptctl.reshard.resume's mark
        fd = os.open(path, os.O_RDONLY)
        try:
            sums[str(path)] = file_crc32c(fd, os.fstat(fd).st_size, [(off, n, c) for _, off, n, _, c in filled])
        finally:
            os.close(fd)


def _patch_crcs(f, crcs: dict[str, int]) -> None:
    """Write each record's CRC-32 into its local header and central-directory entry."""
    f.flush()
    f.seek(0)
    zf = zipfile.ZipFile(f)
    infos = {i.filename: i for i in zf.infolist()}
    start = zf.start_dir
    names = [i.filename for i in zf.infolist()]
    zf.close()
    pos = start
    for name in names:
        f.seek(pos)
        head = f.read(46)
        sig, = struct.unpack_from("<I", head, 0)
        if sig != 0x02014B50:
            raise RuntimeError("zip central directory not where expected")
        nlen, xlen, clen = struct.unpack_from("<HHH", head, 28)
        if name in crcs:
            f.seek(pos + 16)
            f.write(struct.pack("<I", crcs[name]))
            f.seek(infos[name].header_offset + 14)
            f.write(struct.pack("<I", crcs[name]))
        pos += 46 + nlen + xlen + clen


# --- byte-exact: the CRCs where torch's writer puts them, and its serialization id -------------------

_DESCRIPTOR, _CENTRAL = 0x08074B50, 0x02014B50
_MASK64 = (1 << 64) - 1
SERIALIZATION_ID = ".data/serialization_id"


def finish_exact(path: Path, archive: str, filled: list) -> None:
    """Make a `write_skeleton` file byte-identical to torch.save's: torch's writer (miniz, streaming) puts a
    record's CRC-32 in the data descriptor after the data (its local header keeps 0) and in the central
    directory; and `.data/serialization_id` ends with the combined CRC-32 of all records, which the reserved
    records (CRC 0 when it was written) made wrong. `filled`: as `finish_file`'s."""
    crcs = {f"{archive}/{name}": crc for name, _, _, crc, _ in filled}
    sid = f"{archive}/{SERIALIZATION_ID}"
    with open(path, "r+b") as f:
        entries = _central_entries(f)
        combined = 0
        for e in entries:
            if e[0] in crcs:
                _put_crc(f, e, crcs[e[0]])
            if e[0] != sid:
                combined = _hash_combine(combined, crcs.get(e[0], _read_u32(f, e[1] + 16)))
        for e in entries:
            if e[0] == sid:
                data_at = _data_at(f, e[2])
                f.seek(data_at)
                new = f.read(e[3])[:20] + b"%020d" % combined   # c10's record-name hash, then the CRC part
                f.seek(data_at)
                f.write(new)
                _put_crc(f, e, zlib.crc32(new))


def _hash_combine(seed: int, value: int) -> int:
    """c10::hash_combine on a 64-bit size_t (how caffe2's PyTorchStreamWriter combines the records' CRCs)."""
    return (seed ^ ((value + 0x9E3779B9 + (seed << 6) + (seed >> 2)) & _MASK64)) & _MASK64


def _central_entries(f) -> list[tuple[str, int, int, int]]:
    """(name, central-directory entry offset, local header offset, size) of every record, in file order."""
    f.seek(0)
    zf = zipfile.ZipFile(f)
    infos, pos = zf.infolist(), zf.start_dir
    zf.close()
    out = []
    for info in infos:
        f.seek(pos)
        head = f.read(46)
        if struct.unpack_from("<I", head, 0)[0] != _CENTRAL:
            raise RuntimeError("zip central directory not where expected")
        nlen, xlen, clen = struct.unpack_from("<HHH", head, 28)
        out.append((info.filename, pos, info.header_offset, info.compress_size))
        pos += 46 + nlen + xlen + clen
    return out


def _data_at(f, local: int) -> int:
    f.seek(local + 26)
    nlen, xlen = struct.unpack("<HH", f.read(4))
    return local + 30 + nlen + xlen


def _put_crc(f, entry: tuple, crc: int) -> None:
    """A record's CRC-32 where torch's writer puts it: the data descriptor (flag bit 3; else the local
    header) and the central-directory entry."""
    _, pos, local, size = entry
    f.seek(local + 6)
    described = struct.unpack("<H", f.read(2))[0] & 0x8
    at = _data_at(f, local) + size
    if described and _read_u32(f, at) != _DESCRIPTOR:
        raise RuntimeError("zip data descriptor not where expected")
    for where in (at + 4 if described else local + 14, pos + 16):
        f.seek(where)
        f.write(struct.pack("<I", crc))


def _read_u32(f, at: int) -> int:
    f.seek(at)
    return struct.unpack("<I", f.read(4))[0]
