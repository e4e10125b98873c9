"""The Zarr pivot: one array per global tensor, bytes kept exactly, layout-free (DESIGN §5, §8).

bf16 is stored as a uint16 view and fp8 as uint8, with the torch dtype in the array's attributes.
No compression; `write_empty_chunks` so that every chunk exists once written. Every chunk ends in its
crc32c (Zarr v3's `crc32c` codec after `bytes`), checked on every read here and by any zarr client.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from itertools import product
from math import prod
from pathlib import Path
from typing import Callable

import google_crc32c   # what zarr's own crc32c codec uses (a zarr dependency): hardware CRC, ~10 GB/s
import numpy as np
import torch
import zarr
from zarr.codecs import Crc32cCodec

from ckptctl.box import Box
from ckptctl.storage.commit import write_text
from ckptctl.storage.zarr_meta import GROUP_META, ends_in_crc32c
from ckptctl.core.dtypes import BITVIEW, chunk_grid as _grid, dtype_name, storage_dtype, torch_dtype  # noqa: F401 (re-exported)
from ckptctl.errors import BadInput

FORMAT = "ckptctl-store"
FORMAT_VERSION = 2   # 2: every chunk carries a crc32c
CRC = 4              # bytes of the crc32c that ends every chunk file (little-endian uint32, as zarr writes it)

# Dtype naming is one rule for the planner and the store (ckptctl.core.dtypes); the store adds the torch
# view dtype that moves a bit-viewed dtype's bytes (bf16 as uint16).
_VIEW = {name: getattr(torch, view) for name, (_, view) in BITVIEW.items()}


def to_numpy(t: torch.Tensor) -> np.ndarray:
    """The tensor's bytes as a numpy array of the storage dtype (no value conversion)."""
    name = dtype_name(t.dtype)
    if name in _VIEW:
        t = t.view(_VIEW[name])
    return t.contiguous().numpy()


def from_numpy(a: np.ndarray, name: str) -> torch.Tensor:
    a = np.asarray(a)   # a 0-d array stays 0-d (zarr gives a numpy scalar)
    t = torch.from_numpy(a if a.flags.c_contiguous else np.ascontiguousarray(a))
    return t.view(torch_dtype(name)) if name in _VIEW else t


def configure(concurrency: int = 32, threads: int = 2) -> None:
    # DESIGN §8: concurrency and chunk size are the first levers; few threads when ranks share cores.
    zarr.config.set({"async.concurrency": concurrency, "threading.max_workers": threads})


@dataclass
class ArrayInfo:
    """One array's Zarr v3 metadata, parsed once with json (`Store.array`).

    `raw`: chunk files are the chunk's C-order bytes (a `bytes` codec, little-endian, fill value 0,
    regular grid, default chunk keys) followed by their crc32c when `crc` (codec chain bytes + crc32c,
    what ckptctl writes), which `Store.read`/`Store.write` then move directly; any other array goes
    through zarr-python (`.zarr`).
    """
    name: str
    path: Path
    shape: tuple[int, ...]
    chunks: tuple[int, ...]
    dtype: np.dtype
    attrs: dict
    raw: bool
    sep: str
    crc: bool
    _open: Callable[[], zarr.Array]
    _zarr: zarr.Array | None = field(default=None, repr=False)

    @classmethod
    def from_meta(cls, name: str, path: Path, meta: dict, opener: Callable[[], zarr.Array]) -> "ArrayInfo":
        shape = tuple(meta["shape"])
        grid = meta.get("chunk_grid", {})
        chunks = tuple(grid.get("configuration", {}).get("chunk_shape", shape))
        keys = meta.get("chunk_key_encoding", {})
        sep = keys.get("configuration", {}).get("separator", "/")
        codecs = meta.get("codecs", [])
        try:
            dtype = np.dtype(meta["data_type"]).newbyteorder("<")
        except (TypeError, KeyError):
            dtype = None
        crc = ends_in_crc32c(meta)
        raw = (dtype is not None and grid.get("name") == "regular" and keys.get("name") == "default"
               and len(chunks) == len(shape) and len(codecs) == 1 + crc and codecs[0].get("name") == "bytes"
               and codecs[0].get("configuration", {}).get("endian", "little") == "little"
               and meta.get("fill_value") in (0, False) and not meta.get("storage_transformers"))
        return cls(name, path, shape, chunks, dtype, meta.get("attributes", {}), raw, sep, crc, opener)

    @property
    def zarr(self) -> zarr.Array:
        if self._zarr is None:
            self._zarr = self._open()
        return self._zarr

    @property
    def nchunks(self) -> int:
        return prod(-(-s // c) for s, c in zip(self.shape, self.chunks))

    @property
    def nchunks_initialized(self) -> int:
        if not self.raw:
            return self.zarr.nchunks_initialized
        grid = product(*[range(-(-s // c)) for s, c in zip(self.shape, self.chunks)])
        return sum(os.path.isfile(self.chunk_path(i)) for i in grid)

    def chunk_path(self, idx: tuple[int, ...]) -> str:
        return os.path.join(self.path, self.sep.join(["c", *map(str, idx)]))

    @property
    def chunk_nbytes(self) -> int:
        return prod(self.chunks) * self.dtype.itemsize

    @property
    def file_nbytes(self) -> int:
        return self.chunk_nbytes + (CRC if self.crc else 0)

    def where(self, idx: tuple) -> str:
        return f"array {self.name!r} chunk {'.'.join(map(str, idx)) or '0'}"


class Store:
    """A Zarr v3 group on local disk. Rank 0 creates; every worker opens and writes disjoint chunks.

    Chunks are read and written as files (a chunk file is the chunk's raw C-order bytes, edge chunks
    full-size padded with 0), metadata parsed with json: zarr-python's per-call event-loop round trip
    (~1.7 ms) and metadata parsing dominated small conversions. The result stays a Zarr v3 group that
    zarr-python reads identically (tests/test_store.py).
    """

    def __init__(self, path: Path, group: zarr.Group | None = None, mode: str = "r+"):
        self.path = Path(path)
        self.mode = mode
        self._group = group
        self._arrays: dict[str, ArrayInfo] = {}
        self._dirs: set[str] = set()
        self._refs = None
        self._inline: dict[str, dict] | None = None

    @property
    def refs(self):
        """Chunks that are byte ranges of source files (ckptctl.storage.refs), loaded on first read."""
        if self._refs is None:
            from ckptctl.storage.refs import Refs
            self._refs = Refs.load(self.path)
        return self._refs

    @property
    def group(self) -> zarr.Group:
        """The zarr group (opened on first use: objects and non-raw arrays go through it)."""
        if self._group is None:
            self._group = zarr.open_group(str(self.path), mode=self.mode, zarr_format=3)
        return self._group

    @classmethod
    def create(cls, path: Path, arrays: dict[str, dict], attrs: dict) -> "Store":
        """arrays: name -> {"shape", "dtype" (torch name), "chunks"}."""
        root = zarr.open_group(str(path), mode="w", zarr_format=3)
        store = cls(path, root)
        store.add_arrays(arrays)
        store.set_attrs(attrs)
        return store

    def add_arrays(self, arrays: dict[str, dict], existing_ok: bool = False, doc: str | None = None) -> None:
        """Create arrays (name -> spec as in `create`); workers may each add their share concurrently.

        Zarr creates the first array of each storage dtype (and rank: 0-d or not); the others get the
        same metadata document with their shape, chunk shape and attributes written directly, which
        costs microseconds instead of milliseconds per array (thousands of arrays in a large model).
        `existing_ok` (a resumed run): arrays already there are kept as they are, chunks included.

        `doc` (a reference-backed store, `storage.refs`): the other arrays' metadata goes into one document,
        `<store>/<doc>`, instead of a folder and a zarr.json each: such a store is read as Zarr through its
        refs.json, which holds every zarr.json inline, so the per-array files were only round trips (16
        workers' `mkdir`s under one parent contend for its lock: ~0.5 s each on a 16-core host).
        """
        templates: dict[tuple, dict] = {}
        inline: dict[str, dict] = {}
        for name, spec in arrays.items():
            if existing_ok:
                meta = self.inline_meta.get(name) or _read_json(self.path / name / "zarr.json", torn_ok=True)
                if meta is not None:
                    self._arrays[name] = self._info(name, meta)
                    inline[name] = meta
                    continue
            shape = tuple(spec["shape"])
            chunks = tuple(spec["chunks"]) if shape else ()
            key = (storage_dtype(spec["dtype"]), bool(shape))
            if key not in templates:
                self.group.create_array(
                    name, shape=shape, dtype=key[0], chunks=chunks, compressors=Crc32cCodec(), filters=None,
                    fill_value=0, config={"write_empty_chunks": True}, attributes={"torch_dtype": spec["dtype"]})
                meta = templates[key] = json.loads((self.path / name / "zarr.json").read_text())
            else:
                meta = {**templates[key], "shape": list(shape), "attributes": {"torch_dtype": spec["dtype"]},
                        "chunk_grid": {"name": "regular", "configuration": {"chunk_shape": list(chunks)}}}
                if doc is not None:
                    inline[name] = meta
                    self._arrays[name] = self._info(name, meta)
                    continue
                parts = name.split("/")
                for i in range(1, len(parts)):   # implicit parent groups, as zarr writes them
                    _write_json(self.path.joinpath(*parts[:i]) / "zarr.json", GROUP_META, exist_ok=True)
                # written in place, not beside and renamed (~1.5 ms a rename on a busy disk, thousands of arrays):
                # nothing reads an array's metadata before the phase's barrier, and a resumed run rewrites one
                # a crash left torn (`torn_ok` above)
                _write_json(self.path / name / "zarr.json", meta, atomic=False)
            self._arrays[name] = self._info(name, meta)
        if doc is not None:   # one atomic write: readers see all of this worker's arrays or none
            _write_json(self.path / doc, inline)

    @property
    def inline_meta(self) -> dict[str, dict]:
        """Array metadata kept in documents (`add_arrays(doc=...)`), all workers', read once when first
        needed (after the barrier that follows every worker's `add_arrays`)."""
        if self._inline is None:
            from ckptctl.storage.refs import inline_meta
            self._inline = inline_meta(self.path)
        return self._inline

    @classmethod
    def open(cls, path: Path, mode: str = "r") -> "Store":
        path = Path(path)
        meta = _read_json(path / "zarr.json")
        if meta is None or meta.get("zarr_format") != 3 or meta.get("node_type") != "group":
            raise BadInput(f"{path}: not a ckptctl Zarr store")
        fmt = meta.get("attributes", {}).get("format")
        if fmt not in (None, FORMAT):
            raise BadInput(f"{path}: store format {fmt!r} is not {FORMAT}")
        return cls(path, mode=mode)

    @property
    def attrs(self) -> dict:
        return dict((_read_json(self.path / "zarr.json") or {}).get("attributes", {}))

    def set_attrs(self, attrs: dict) -> None:
        doc = _read_json(self.path / "zarr.json")
        doc["attributes"] = {**doc.get("attributes", {}), **json.loads(json.dumps(attrs))}
        _write_json(self.path / "zarr.json", doc)
        self._group = None   # a zarr group opened before holds the old attributes

    def _info(self, name: str, meta: dict) -> ArrayInfo:
        return ArrayInfo.from_meta(name, self.path / name, meta, lambda: self.group[name])

    def array(self, name: str) -> ArrayInfo:
        a = self._arrays.get(name)
        if a is None:
            meta = self.inline_meta.get(name) or _read_json(self.path / name / "zarr.json")
            if meta is None and self._inline is not None:
                self._inline = None   # read before another worker's document was there (a resumed run)
                meta = self.inline_meta.get(name)
            if meta is None or meta.get("node_type") != "array":
                raise BadInput(f"{self.path}: no array {name!r} in the store")
            a = self._arrays[name] = self._info(name, meta)
        return a

    def write(self, name: str, box: Box, t: torch.Tensor) -> None:
        a = self.array(name)
        x = to_numpy(t).reshape(box.sizes)
        if not a.raw:
            a.zarr[box.slices] = x
            return
        if self.mode == "r":
            raise ValueError(f"{self.path}: store opened read-only")
        _check_box(a, box)
        if x.dtype != a.dtype:
            x = x.astype(a.dtype)
        if 0 in box.sizes:
            return
        for idx, box_sl, chunk_sl, full in _grid(a.shape, a.chunks, box.offsets, box.sizes):
            part = x[box_sl]
            if full and part.shape == a.chunks:
                buf = np.ascontiguousarray(part)
            else:
                # an edge chunk is stored full-size, padded with the fill value; a chunk the box covers
                # only partly is read, modified and written back (each chunk has one writer: the planner's
                # chunk grid lies inside the writers' boxes, so the same write through zarr is no safer)
                buf = np.zeros(a.chunks, a.dtype) if full else self._chunk(a, idx, copy=True, missing_ok=True)
                buf[chunk_sl] = part
            path = a.chunk_path(idx)
            parent = os.path.dirname(path)
            if parent not in self._dirs:
                os.makedirs(parent, exist_ok=True)
                self._dirs.add(parent)
            data = buf.reshape(-1).view(np.uint8)
            with open(path, "wb") as f:
                f.write(data)
                if a.crc:
                    f.write(_crc(data))

    def read(self, name: str, box: Box) -> torch.Tensor:
        a = self.array(name)
        if not a.raw:
            return from_numpy(a.zarr[box.slices], a.attrs["torch_dtype"])
        _check_box(a, box)
        out = np.empty(box.sizes, a.dtype)
        if 0 not in box.sizes:
            for idx, box_sl, chunk_sl, full in _grid(a.shape, a.chunks, box.offsets, box.sizes):
                dst = out[box_sl]
                if self.refs and self.refs.read(a, idx, dst, chunk_sl, full):
                    continue
                # a small whole chunk is read into place; a large one (or part of one) is copied from a
                # memory map (about twice as fast as read() from the page cache here)
                if full and a.chunk_nbytes <= _MMAP_MIN and dst.shape == a.chunks and dst.flags.c_contiguous:
                    self._read_into(a, idx, dst)
                    continue
                src = self._chunk(a, idx, copy=False)
                dst[...] = src[chunk_sl]
                del src
        return from_numpy(out, a.attrs["torch_dtype"])

    def _missing(self, a: ArrayInfo, idx: tuple) -> BadInput:
        # a read only ever asks for chunks the source phase wrote: a missing one is damage, never zeros
        return BadInput(f"{self.path}: {a.where(idx)} is missing ({a.chunk_path(idx)}); the store is damaged")

    def _check(self, a: ArrayInfo, idx: tuple, data: np.ndarray, stored: bytes) -> None:
        if a.crc and _crc(data) != stored:
            raise BadInput(f"{self.path}: {a.where(idx)} fails its crc32c checksum ({a.chunk_path(idx)}); "
                           "the store is damaged")

    def _read_into(self, a: ArrayInfo, idx: tuple, dst: np.ndarray) -> None:
        path = a.chunk_path(idx)
        try:
            f = open(path, "rb", buffering=0)
        except FileNotFoundError:
            raise self._missing(a, idx) from None
        with f:
            data = dst.reshape(-1).view(np.uint8)
            n = f.readinto(data)
            tail = f.read(CRC + 1) if a.crc else f.read(1)
            if n != a.chunk_nbytes or len(tail) != (CRC if a.crc else 0):
                raise BadInput(f"{self.path}: {a.where(idx)}: chunk file {path} is not {a.file_nbytes} bytes")
        self._check(a, idx, data, tail)

    def _chunk(self, a: ArrayInfo, idx: tuple, copy: bool, missing_ok: bool = False) -> np.ndarray | None:
        """One chunk as an array of the chunk shape, its crc32c checked: read into memory when `copy`,
        else memory-mapped when large; one chunk at a time. Absent: zeros with `missing_ok` (a writer
        filling a chunk part by part), else an error."""
        path = a.chunk_path(idx)
        try:
            size = os.path.getsize(path)
        except FileNotFoundError:
            if missing_ok:
                return np.zeros(a.chunks, a.dtype)
            raise self._missing(a, idx) from None
        if size != a.file_nbytes:
            raise BadInput(f"{self.path}: {a.where(idx)}: chunk file {path} has {size} bytes, not {a.file_nbytes}")
        if copy or size <= _MMAP_MIN:
            raw = np.fromfile(path, dtype=np.uint8)
        else:
            raw = np.memmap(path, dtype=np.uint8, mode="r", shape=(size,))
        body = raw[:a.chunk_nbytes]
        self._check(a, idx, body, raw[a.chunk_nbytes:].tobytes())
        return body.view(a.dtype).reshape(a.chunks)

    def complete(self, name: str) -> bool:
        a = self.array(name)
        return a.nchunks_initialized == a.nchunks


_MMAP_MIN = 1 << 20   # chunks read through a memory map above this size, read() below


def _crc(data: np.ndarray) -> bytes:
    """crc32c of a chunk's bytes as zarr's crc32c codec appends it (uint32, little-endian)."""
    return int(google_crc32c.value(data)).to_bytes(CRC, "little")


def _check_box(a: ArrayInfo, box: Box) -> None:
    if len(box.sizes) != len(a.shape) or any(
            o < 0 or s < 0 or o + s > n for o, s, n in zip(box.offsets, box.sizes, a.shape)):
        raise IndexError(f"box {box} outside array {a.name} of shape {a.shape}")


def _read_json(path: Path, torn_ok: bool = False) -> dict | None:
    """The document, None when absent (or, with `torn_ok`, not a whole JSON document)."""
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError:
        return None
    except ValueError:
        if torn_ok:
            return None
        raise


def _write_json(path: Path, doc: dict, exist_ok: bool = False, atomic: bool = True) -> None:
    if exist_ok and path.exists():
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    if not atomic:
        path.write_text(json.dumps(doc))
        return
    # compact: the C encoder (indent=2 goes through pure Python); atomic: workers creating the same parent
    # group never see half a file
    write_text(path, json.dumps(doc))
