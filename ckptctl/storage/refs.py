"""The reference-backed pivot (issue 13): store chunks that are byte ranges of the source files.

For a direct SRC -> DST conversion the store is a hidden, temporary pivot. A store chunk is a box of a
global tensor cut from one source piece (the planner's chunk grid lies inside every writer's box), so a
chunk whose elements are contiguous in the source tensor is one byte range of one source file (torch's
zip entries and DCP's blobs hold raw, uncompressed bytes). The source phase then records, per chunk,
`[file, offset, length, crc32c]` instead of copying the bytes; only chunks that are not one contiguous
range are written as chunk files (as before). The source is only ever opened for reading.

Files in the store (besides the Zarr v3 group, its chunk files and a few arrays' zarr.json):

    refs/<rank>.jsonl   per source worker, one line per finished source unit: {chunk key: [file, offset,
                        length, crc32c]}; a line cut short by a kill is ignored (its unit is not marked done,
                        so a --resume run redoes it and appends it again)
    refs/arrays-<rank>.json
                        per source worker, the zarr.json of the arrays it created, in one document
                        (`Store.add_arrays(doc=...)`): only the first array of each dtype has its own
                        folder and zarr.json; refs.json carries every one inline
    refs.json           written by rank 0 when the source phase is complete: the whole store as a
                        kerchunk / fsspec ReferenceFileSystem v1 document (every zarr.json inline, every
                        chunk a reference, referenced or materialized) plus `crc32c`: {chunk key: crc}

Chunk keys are `<array>/c/<i>/<j>...` (the Zarr v3 default key encoding). Reading a referenced chunk
reads the range and checks its crc32c (the checksum of the bytes the source phase read): a source file
changed since then is an error naming the file. Plain zarr-python reads the store through fsspec:

    fs = fsspec.filesystem("reference", fo="STORE/refs.json", asynchronous=True)
    zarr.open_group(zarr.storage.FsspecStore(fs, read_only=True), mode="r")

In refs.json every array's codec chain is `bytes` alone (the referenced source bytes have no crc32c
trailer); a materialized chunk file is referenced without its 4-byte trailer.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import google_crc32c
import numpy as np
import torch

from ckptctl.box import Box
from ckptctl.errors import BadInput
from ckptctl.storage.commit import write_text
from ckptctl.storage.zarr_meta import GROUP_META, ends_in_crc32c

REFS_DIR = "refs"
REFS_FILE = "refs.json"
_MAP_MIN = 1 << 20   # a chunk read in part above this size is memory-mapped (as Store reads its chunk files)


def chunk_key(name: str, sep: str, idx: tuple) -> str:
    return name + "/" + sep.join(["c", *map(str, idx)])


def arrays_doc(rank: int) -> str:
    """Where source worker `rank` keeps its arrays' metadata, relative to the store."""
    return f"{REFS_DIR}/arrays-{rank}.json"


def inline_meta(root: Path) -> dict[str, dict]:
    """Every worker's `arrays_doc`, merged (none: a store whose arrays all have their own zarr.json)."""
    out: dict[str, dict] = {}
    for part in sorted((Path(root) / REFS_DIR).glob("arrays-*.json")):
        out.update(json.loads(part.read_text()))   # written whole (beside, then renamed)
    return out


# --- source phase ---------------------------------------------------------------------------------

class RefWriter:
    """One source worker's references, appended to `refs/<rank>.jsonl` once per finished unit."""

    def __init__(self, store, rank: int):
        self.store, self.rank = store, rank
        self.pending: dict[str, list] = {}
        self.count = self.nbytes = 0           # referenced chunks and bytes (reported)
        self.copied = 0                        # bytes of chunks that had to be materialized

    def put(self, p, tensor: torch.Tensor, where, progress, mapped: bool) -> bool:
        """Piece `p` of `tensor` (the whole local tensor) into the store, by reference where it can be.
        `where`: (file, offset of the tensor's storage's first byte), or None. False: nothing done here
        (the caller writes the piece as before)."""
        import ckptctl.reshard.stream as stream
        from ckptctl.core.dtypes import chunk_grid as _grid

        a = self.store.array(p.array)
        lead = len(p.gbox.sizes) - len(p.local.sizes)
        if (where is None or not a.raw or not a.crc or not p.local.sizes or 0 in p.gbox.sizes
                or a.dtype.itemsize != tensor.element_size()
                or any(o % c or s % c for o, s, c in zip(p.gbox.offsets, p.gbox.sizes, a.chunks))):
            return False   # a chunk grid not aligned to this piece (never from the planner): copy as before
        path, storage_off = where
        base = tensor.untyped_storage().data_ptr()
        for idx, box_sl, _, _ in _grid(a.shape, a.chunks, p.gbox.offsets, p.gbox.sizes):
            local = tuple(slice(lo + s.start, lo + s.stop) for lo, s in zip(p.local.offsets, box_sl[lead:-1]))
            sub = tensor[local]
            n = sub.numel() * sub.element_size()
            if sub.is_contiguous():
                data = sub.reshape(-1).view(torch.uint8).numpy()
                crc = int(google_crc32c.value(data))
                self.pending[chunk_key(p.array, a.sep, idx)] = [path, storage_off + sub.data_ptr() - base, n, crc]
                self.count += 1
                self.nbytes += n
            else:
                gbox = Box(tuple(o + s.start for o, s in zip(p.gbox.offsets, box_sl[:-1])),
                           tuple(s.stop - s.start for s in box_sl[:-1]))
                self.store.write(p.array, gbox, sub)
                self.copied += n
            if mapped:
                stream.release_pages(sub)
            progress.add(n)
        return True

    def flush(self) -> None:
        """Append this unit's references as one line (one write: a kill leaves at most a cut last line)."""
        if not self.pending:
            return
        d = Path(self.store.path) / REFS_DIR
        d.mkdir(exist_ok=True)
        line = json.dumps(self.pending, separators=(",", ":")) + "\n"
        fd = os.open(d / f"{self.rank}.jsonl", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        try:
            os.write(fd, line.encode())
        finally:
            os.close(fd)
        self.pending = {}


def finish(store) -> None:
    """Rank 0, source phase complete: write refs.json (the kerchunk view of the whole store)."""
    root = Path(store.path)
    entries = _load_parts(root)
    refs: dict[str, object] = {}
    crcs = {k: e[3] for k, e in entries.items()}
    docs = {k + "/zarr.json": v for k, v in inline_meta(root).items()}
    for name in list(docs):   # the parent groups of arrays without a folder of their own, as zarr writes them
        parts = name.split("/")[:-2]
        for i in range(1, len(parts) + 1):
            docs.setdefault("/".join(parts[:i]) + "/zarr.json", GROUP_META)
    for dirpath, dirs, files in os.walk(root):
        dirs.sort()
        rel = os.path.relpath(dirpath, root)
        prefix = "" if rel == "." else rel.replace(os.sep, "/") + "/"
        if prefix.startswith(REFS_DIR + "/"):
            dirs[:] = []
            continue
        doc = json.loads((Path(dirpath) / "zarr.json").read_text()) if "zarr.json" in files else \
            docs.get(prefix + "zarr.json")
        if doc is None:
            continue
        docs[prefix + "zarr.json"] = doc
        if doc.get("node_type") == "array":
            # an array's subfolders are its chunks (materialized ones: the rest are references)
            for cdir, _, cfiles in os.walk(dirpath):
                for f in cfiles:
                    if f == "zarr.json" or f.startswith("."):
                        continue
                    full = os.path.join(cdir, f)
                    key = prefix + os.path.relpath(full, dirpath).replace(os.sep, "/")
                    refs[key] = [os.path.abspath(full), 0, os.path.getsize(full) - _trailer(doc)]
            dirs[:] = []
    for key, doc in sorted(docs.items()):
        if doc.get("node_type") == "array" and _trailer(doc):
            doc = {**doc, "codecs": doc["codecs"][:1]}   # referenced bytes carry no crc32c trailer
        refs[key] = json.dumps(doc)
    for k, e in entries.items():
        refs[k] = e[:3]
    write_text(root / REFS_FILE, json.dumps({"version": 1, "refs": refs, "crc32c": crcs}, separators=(",", ":")))


def _trailer(doc: dict) -> int:
    """Bytes of crc32c after each chunk file's body."""
    return 4 if ends_in_crc32c(doc) else 0


def _load_parts(root: Path) -> dict[str, list]:
    out: dict[str, list] = {}
    d = root / REFS_DIR
    if not d.is_dir():
        return out
    for part in sorted(d.glob("*.jsonl")):
        for line in part.read_bytes().split(b"\n"):
            try:
                out.update(json.loads(line))
            except ValueError:
                continue   # empty, or the last line of a worker killed while writing it
    return out


# --- reading --------------------------------------------------------------------------------------

class Refs:
    """The chunk references of one store (empty: a self-contained store)."""

    def __init__(self, entries: dict[str, list]):
        self.entries = entries
        self._fds: dict[str, int] = {}

    def __bool__(self):
        return bool(self.entries)

    @classmethod
    def load(cls, root: Path) -> "Refs":
        root = Path(root)
        try:
            doc = json.loads((root / REFS_FILE).read_text())
        except FileNotFoundError:
            return cls(_load_parts(root))
        crcs = doc.get("crc32c", {})
        return cls({k: [*v, crcs[k]] for k, v in doc["refs"].items() if k in crcs})

    def read(self, a, idx: tuple, dst: np.ndarray, chunk_sl: tuple, full: bool) -> bool:
        """Chunk `idx` of array `a` into `dst` (its part `chunk_sl`) if it is a reference; False if not."""
        e = self.entries.get(chunk_key(a.name, a.sep, idx))
        if e is None:
            return False
        path, off, n, crc = e
        if n != a.chunk_nbytes:
            raise BadInput(f"{path}: reference of store {a.where(idx)} is {n} bytes, the chunk {a.chunk_nbytes}")
        if full and dst.shape == a.chunks and dst.flags.c_contiguous:
            buf = dst.reshape(-1).view(np.uint8)
            self._pread(path, off, buf)
            self._check(a, idx, e, buf)
            return True
        if n > _MAP_MIN:   # a large chunk needed in part: mapped from the page cache, not copied whole first
            try:
                buf = np.memmap(path, dtype=np.uint8, mode="r", offset=off, shape=(n,))
            except (OSError, ValueError):   # missing or shorter than the reference: named by _pread below
                buf = None
        else:
            buf = None
        if buf is None:
            buf = np.empty(n, np.uint8)
            self._pread(path, off, buf)
        self._check(a, idx, e, buf)
        dst[...] = buf.view(a.dtype).reshape(a.chunks)[chunk_sl]
        del buf
        return True

    def _pread(self, path: str, off: int, buf: np.ndarray) -> None:
        fd = self._fds.get(path)
        if fd is None:
            if len(self._fds) >= 64:   # a few source files at a time: never near the open-file limit
                self.close()
            try:
                fd = self._fds[path] = os.open(path, os.O_RDONLY)
            except OSError as e:
                raise BadInput(f"{path}: cannot read the source file ({e.strerror}); it was removed or "
                               "changed during the conversion") from None
        view, done = memoryview(buf), 0
        while done < len(view):
            got = os.preadv(fd, [view[done:]], off + done)
            if got <= 0:
                raise BadInput(f"{path}: ends before byte {off + len(view)}; the source file was truncated "
                               "during the conversion")
            done += got

    @staticmethod
    def _check(a, idx: tuple, e: list, buf: np.ndarray) -> None:
        if int(google_crc32c.value(buf)) != e[3]:
            raise BadInput(f"{e[0]}: bytes {e[1]}..{e[1] + e[2]} ({a.where(idx)}) fail their crc32c: the source "
                           "file changed since the source phase read it")

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds = {}
