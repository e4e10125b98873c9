"""The Zarr pivot: one array per global tensor, bytes kept exactly, layout-free (DESIGN §5, §8).

bf16 is stored as a uint16 view and fp8 as uint8, with the torch dtype in the array's attributes.
No compression; `write_empty_chunks` so that every chunk exists once written.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import torch
import zarr

from ckptctl.box import Box
from ckptctl.errors import BadInput

FORMAT = "ckptctl-store"
FORMAT_VERSION = 1

# torch dtype name -> (numpy storage dtype, torch view dtype used to move bytes)
_BITVIEW = {
    "bfloat16": ("uint16", torch.uint16),
    "float8_e4m3fn": ("uint8", torch.uint8),
    "float8_e5m2": ("uint8", torch.uint8),
}
_NATIVE = {
    "float16": "float16", "float32": "float32", "float64": "float64", "int8": "int8", "int16": "int16",
    "int32": "int32", "int64": "int64", "uint8": "uint8", "bool": "bool",
}


def dtype_name(t: torch.dtype) -> str:
    return str(t).removeprefix("torch.")


def torch_dtype(name: str) -> torch.dtype:
    return getattr(torch, name)


def storage_dtype(name: str) -> str:
    if name in _BITVIEW:
        return _BITVIEW[name][0]
    if name in _NATIVE:
        return _NATIVE[name]
    raise BadInput(f"unsupported tensor dtype {name}")


def to_numpy(t: torch.Tensor) -> np.ndarray:
    """The tensor's bytes as a numpy array of the storage dtype (no value conversion)."""
    name = dtype_name(t.dtype)
    if name in _BITVIEW:
        t = t.view(_BITVIEW[name][1])
    return t.contiguous().numpy()


def from_numpy(a: np.ndarray, name: str) -> torch.Tensor:
    t = torch.from_numpy(np.ascontiguousarray(a))
    return t.view(torch_dtype(name)) if name in _BITVIEW else t


def configure(concurrency: int = 32, threads: int = 2) -> None:
    # DESIGN §8: concurrency and chunk size are the first levers; few threads when ranks share cores.
    zarr.config.set({"async.concurrency": concurrency, "threading.max_workers": threads})


class Store:
    """A Zarr v3 group on local disk. Rank 0 creates; every worker opens and writes disjoint chunks."""

    def __init__(self, path: Path, group: zarr.Group):
        self.path = Path(path)
        self.group = group
        self._arrays: dict[str, zarr.Array] = {}

    @classmethod
    def create(cls, path: Path, arrays: dict[str, dict], attrs: dict) -> "Store":
        """arrays: name -> {"shape", "dtype" (torch name), "chunks"}."""
        root = zarr.open_group(str(path), mode="w", zarr_format=3)
        store = cls(path, root)
        store.add_arrays(arrays)
        root.attrs.update(json.loads(json.dumps(attrs)))
        return store

    def add_arrays(self, arrays: dict[str, dict]) -> None:
        """Create arrays (name -> spec as in `create`); workers may each add their share concurrently.

        Zarr creates the first array of each storage dtype (and rank: 0-d or not); the others get the
        same metadata document with their shape, chunk shape and attributes written directly, which
        costs microseconds instead of milliseconds per array (thousands of arrays in a large model).
        """
        templates: dict[tuple, dict] = {}
        for name, spec in arrays.items():
            shape = tuple(spec["shape"])
            chunks = tuple(spec["chunks"]) if shape else ()
            key = (storage_dtype(spec["dtype"]), bool(shape))
            if key not in templates:
                self.group.create_array(
                    name, shape=shape, dtype=key[0], chunks=chunks, compressors=None, filters=None,
                    fill_value=0, config={"write_empty_chunks": True}, attributes={"torch_dtype": spec["dtype"]})
                templates[key] = json.loads((self.path / name / "zarr.json").read_text())
                continue
            meta = {**templates[key], "shape": list(shape), "attributes": {"torch_dtype": spec["dtype"]},
                    "chunk_grid": {"name": "regular", "configuration": {"chunk_shape": list(chunks)}}}
            parts = name.split("/")
            for i in range(1, len(parts)):   # implicit parent groups, as zarr writes them
                _write_json(self.path.joinpath(*parts[:i]) / "zarr.json", _GROUP_META, exist_ok=True)
            _write_json(self.path / name / "zarr.json", meta)

    @classmethod
    def open(cls, path: Path, mode: str = "r") -> "Store":
        path = Path(path)
        if not (path / "zarr.json").is_file():
            raise BadInput(f"{path}: not a ckptctl Zarr store")
        root = zarr.open_group(str(path), mode=mode, zarr_format=3)
        if root.attrs.get("format") not in (None, FORMAT):
            raise BadInput(f"{path}: store format {root.attrs.get('format')!r} is not {FORMAT}")
        return cls(path, root)

    @property
    def attrs(self) -> dict:
        return dict(self.group.attrs)

    def set_attrs(self, attrs: dict) -> None:
        self.group.attrs.update(json.loads(json.dumps(attrs)))

    def array(self, name: str) -> zarr.Array:
        a = self._arrays.get(name)
        if a is None:
            try:
                a = self._arrays[name] = self.group[name]
            except KeyError:
                raise BadInput(f"{self.path}: no array {name!r} in the store") from None
        return a

    def write(self, name: str, box: Box, t: torch.Tensor) -> None:
        a = self.array(name)
        a[box.slices] = to_numpy(t).reshape(box.sizes)

    def read(self, name: str, box: Box) -> torch.Tensor:
        a = self.array(name)
        return from_numpy(a[box.slices], a.attrs["torch_dtype"])

    def complete(self, name: str) -> bool:
        a = self.array(name)
        return a.nchunks_initialized == a.nchunks


_GROUP_META = {"attributes": {}, "zarr_format": 3, "node_type": "group"}   # what zarr writes for a parent


def _write_json(path: Path, doc: dict, exist_ok: bool = False) -> None:
    if exist_ok and path.exists():
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    tmp.write_text(json.dumps(doc, indent=2))
    os.replace(tmp, path)   # atomic: workers creating the same parent group never see half a file


def chunk_shape(shape: tuple[int, ...], boxes: list[Box], itemsize: int, max_bytes: int = 64 << 20) -> tuple[int, ...]:
    """A chunk grid in which every chunk lies inside one writer's box (gcd of all box edges),
    then cut along dim 0 (by a divisor) until a chunk is at most `max_bytes`."""
    from math import gcd

    if not shape:
        return ()
    c = list(shape)
    for b in boxes:
        for d in range(len(shape)):
            c[d] = gcd(c[d], gcd(b.offsets[d], b.sizes[d]))
    c = [max(1, x) for x in c]
    rest = itemsize
    for x in c[1:]:
        rest *= x
    while c[0] > 1 and c[0] * rest > max_bytes:
        for div in range(2, c[0] + 1):
            if c[0] % div == 0:
                c[0] //= div
                break
    return tuple(c)
