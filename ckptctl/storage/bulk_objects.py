"""Small objects in bulk: the `_extra_state`s and RNG states of one source rank file are pickled together,
once per kind (`torch.save` of {slot: value}), into one row of one Zarr array per kind (`objects_bulk/extra`,
`objects_bulk/rng`: uint8, shape (source units, CAP), chunks of CHUNK bytes), instead of one Zarr array and
one `torch.save` per object (~4 ms each: 10,409 objects at 1,024 files, 69,545 at 8,192 files of a 671B
MoE). A reader unpickles a row once and keeps the last few.

A row's bytes are the pickle, zero-padded to whole chunks; each chunk file is zstd (padding costs nothing)
then crc32c, the codecs zarr-python itself writes, so plain zarr reads them: the store's `objects`
attribute maps each slot to `row:<kind>:<row>:<length>`, and
`torch.load(io.BytesIO(zarr.open_group(store)[f"objects_bulk/{kind}"][row, :length].tobytes()))[slot]`
is the object. Rows belong to one source unit, so each chunk has one writer (`convert --resume` rewrites
the rows of the files it redoes). The common state (one or two objects) stays in `storage.objects`.
"""
from __future__ import annotations

import copy
import json
import weakref
from collections import OrderedDict
from pathlib import Path

import google_crc32c
import numpy as np

from ckptctl.errors import BadInput
from ckptctl.storage.commit import write_beside
from ckptctl.storage.pickles import dumps_bytes, loads_bytes
from ckptctl.storage.zarr_meta import GROUP_META

BULK = "objects_bulk/"
CHUNK = 256 << 10        # bytes per chunk: a typical row (a file's extra states, or its RNG state) is one
CAP = 1 << 40            # bytes per row at most (the array's second dimension; unwritten chunks cost nothing)
PREFIX = "row:"
_CACHE_ROWS = 8          # unpickled rows a reader keeps (a target file reads its objects from a few rows)


def kind_of(slot: str) -> str:
    return "rng" if slot.startswith("rng@") else "extra"


def array_meta(rows: int) -> dict:
    """The zarr.json zarr-python 3 writes for such an array (checked by tests/test_bulk_objects.py)."""
    return {"shape": [rows, CAP], "data_type": "uint8",
            "chunk_grid": {"name": "regular", "configuration": {"chunk_shape": [1, CHUNK]}},
            # "c.<row>.<chunk>": one folder for all rows (a folder per row cost a mkdir per source file)
            "chunk_key_encoding": {"name": "default", "configuration": {"separator": "."}}, "fill_value": 0,
            "codecs": [{"name": "bytes"}, {"name": "zstd", "configuration": {"level": 1, "checksum": False}},
                       {"name": "crc32c"}],
            "attributes": {"ckptctl": "torch.save({slot: object}) per row; index: the store's 'objects' attribute"},
            "zarr_format": 3, "node_type": "array", "storage_transformers": []}


def _zstd():
    from numcodecs import Zstd   # zarr's own zstd (numcodecs is a zarr dependency)
    return Zstd(level=1)


_made: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()   # store -> metadata paths known in place


def _write_json_once(store, path: Path, doc: dict) -> None:
    # every writer of a store writes the same document: whichever lands last, it is complete (atomic);
    # checked once per opened store, not once per source file
    made = _made.setdefault(store, set())
    if path in made:
        return
    made.add(path)
    if path.exists():
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    with write_beside(path, "w", fsync=False) as f:
        f.write(json.dumps(doc))


def _chunk_path(root: Path, kind: str, row: int, c: int) -> Path:
    return root / BULK / kind / f"c.{row}.{c}"


class ObjectRows:
    """The objects of one source unit (row `row` of `rows`), collected by `put`, written by `flush`."""

    def __init__(self, store, row: int, rows: int):
        if not 0 <= row < rows:
            raise ValueError(f"row {row} outside 0..{rows - 1}")
        self.store, self.row, self.rows = store, row, rows
        self.kinds: dict[str, dict] = {}
        self.none: list[str] = []

    def put(self, slot: str, value) -> None:
        """Collect `value`; `flush` writes it and says its encoding."""
        if value is None:
            self.none.append(slot)
        else:
            self.kinds.setdefault(kind_of(slot), {})[slot] = value

    def flush(self) -> dict[str, str]:
        """Write each kind's row (one pickle, whole chunks); {slot: encoding} of everything `put` took."""
        root = Path(self.store.path)
        out: dict[str, str] = {s: "none" for s in self.none}
        codec = None
        for kind, objs in self.kinds.items():
            data = dumps_bytes(objs)
            if len(data) > CAP:      # never in practice (a TiB of small objects in one rank file)
                raise BadInput(f"objects of source unit {self.row}: {len(data)} bytes of {kind} objects exceed {CAP}")
            _write_json_once(self.store, root / BULK / "zarr.json", GROUP_META)
            _write_json_once(self.store, root / BULK / kind / "zarr.json", array_meta(self.rows))
            n = -(-len(data) // CHUNK)
            buf = np.zeros(n * CHUNK, np.uint8)
            buf[:len(data)] = np.frombuffer(data, np.uint8)
            codec = codec or _zstd()
            for c in range(n):
                z = bytes(codec.encode(buf[c * CHUNK:(c + 1) * CHUNK]))
                path = _chunk_path(root, kind, self.row, c)
                # in place, as Store.write writes model chunks (no fsync per chunk): a worker killed mid-write
                # has not marked its file done, so --resume rewrites the row
                with open(path, "wb") as f:
                    f.write(z + int(google_crc32c.value(z)).to_bytes(4, "little"))
            enc = f"{PREFIX}{kind}:{self.row}:{len(data)}"
            out.update({s: enc for s in objs})
        self.kinds, self.none = {}, []
        return out


_cache: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()   # store -> OrderedDict[(kind, row)] = dict


def _row(store, kind: str, row: int, length: int) -> dict:
    rows = _cache.setdefault(store, OrderedDict())
    hit = rows.get((kind, row, length))
    if hit is not None:
        rows.move_to_end((kind, row, length))
        return hit
    root, codec, parts = Path(store.path), _zstd(), []
    for c in range(-(-length // CHUNK)):
        path = _chunk_path(root, kind, row, c)
        where = f"{store.path}: objects_bulk/{kind} row {row} chunk {c}"
        try:
            raw = path.read_bytes()
        except FileNotFoundError:
            raise BadInput(f"{where} is missing ({path}); the store is damaged") from None
        body = raw[:-4]
        if len(raw) < 4 or int(google_crc32c.value(body)).to_bytes(4, "little") != raw[-4:]:
            raise BadInput(f"{where} fails its crc32c checksum ({path}); the store is damaged")
        data = bytes(codec.decode(body))
        if len(data) != CHUNK:
            raise BadInput(f"{where}: decoded to {len(data)} bytes, not {CHUNK} ({path}); the store is damaged")
        parts.append(data)
    objs = loads_bytes(b"".join(parts)[:length], f"objects_bulk/{kind} row {row}")
    if not isinstance(objs, dict):
        raise BadInput(f"{store.path}: objects_bulk/{kind} row {row} is not a dict of objects; the store is damaged")
    rows[(kind, row, length)] = objs
    while len(rows) > _CACHE_ROWS:
        rows.popitem(last=False)
    return objs


def is_bulk(enc: str) -> bool:
    return enc.startswith(PREFIX)


def get(store, slot: str, enc: str):
    """The object an encoding from `ObjectRows.flush` names (a copy: callers may consume a BytesIO)."""
    try:
        kind, row, length = enc[len(PREFIX):].split(":")
        row, length = int(row), int(length)
    except ValueError:
        raise BadInput(f"{store.path}: object {slot}: malformed encoding {enc!r}") from None
    objs = _row(store, kind, row, length)
    if slot not in objs:
        raise BadInput(f"{store.path}: object {slot} is not in objects_bulk/{kind} row {row}; the store is damaged")
    return copy.deepcopy(objs[slot])
