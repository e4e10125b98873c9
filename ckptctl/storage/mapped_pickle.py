"""Rank files read without torch's pure-Python unpickler (issue 13: start-up of a tiny convert).

`torch.load(weights_only=True)` runs its allow-listing unpickler in Python: ~40 ms for a 1 MiB rank file
with ~300 tensors, a third of a tiny convert's source phase. `load` builds the same object with the
C unpickler and `lite_pickle`'s allow-list (the one `inspect` uses, a subset of what the torch path admits:
`tests/test_inspect_lite.py`), and makes each tensor exactly as `torch.load(mmap=True)` does: one mapping
of the whole file (`UntypedStorage.from_file`, torch's own mmap option), each storage the slice of it at the
offset torch's zip reader gives for `data/<key>`, each tensor `set_` on that storage with the pickled
offset, size and stride. So the tensors' bytes, views and sharing, the mapping that
`formats/legacy/offsets.RankFileLocator` finds in `/proc/self/maps`, and the page dropping of
`reshard/stream` are the same as before; numpy's RNG arrays are real arrays, built by the globals
`pickles.safe_globals()` admits.

Anything else (a global outside the list, tensor metadata or hooks, a big-endian or TorchScript file, a
storage past the end of the file, a file torch's reader rejects) raises `NotLite`: the caller then uses
torch.load, which accepts, refuses or names the damage as before.
"""
from __future__ import annotations

import io
import mmap
import os
from pathlib import Path

import torch

from ckptctl.storage import lite_pickle as lite
from ckptctl.storage.allow_list import safe_globals

NotLite = lite.NotLite
_numpy_globals: dict | None = None


def _numpy() -> dict:
    """(module, name) -> object for the numpy globals of `safe_globals()`, named as torch's unpickler
    names them (`module.qualname`, or the alias given beside the object)."""
    global _numpy_globals
    if _numpy_globals is None:
        out = {}
        for g in safe_globals():
            obj, qual = g if isinstance(g, tuple) else (g, f"{g.__module__}.{g.__qualname__}")
            if qual.startswith("numpy"):
                out[tuple(qual.rsplit(".", 1))] = obj
        _numpy_globals = out
    return _numpy_globals


class _Unpickler(lite._Unpickler):
    def __init__(self, data: bytes, reader, whole, size: int):
        super().__init__(io.BytesIO(data))
        self.reader, self.whole, self.size = reader, whole, size
        self.storages: dict[str, torch.UntypedStorage] = {}
        self.torch_globals = {
            ("torch._utils", "_rebuild_tensor_v2"): self.rebuild_tensor,
            ("torch._utils", "_rebuild_parameter"): self.rebuild_parameter,
            ("torch._utils", "_rebuild_parameter_with_state"): self.rebuild_parameter,
            ("torch", "Size"): torch.Size,
        }

    def find_class(self, module, name):
        hit = self.torch_globals.get((module, name))
        if hit is None and module == "torch" and name in lite._DTYPES:
            hit = getattr(torch, name)
        if hit is None:
            hit = _numpy().get((module, name))
        if hit is not None:
            return hit
        hit = super().find_class(module, name)
        if hit is lite.Opaque:   # a numpy name inspect tolerates but safe_globals() does not admit
            raise NotLite(f"global {module}.{name}")
        return hit

    def storage(self, s: lite._Storage) -> tuple[torch.dtype, torch.UntypedStorage]:
        """The slice of the file mapping holding entry data/<key>; one per key, as torch.load shares it."""
        dtype = getattr(torch, s.dtype)
        hit = self.storages.get(s.key)
        if hit is None:
            nbytes = s.numel * torch._utils._element_size(dtype)
            name = f"data/{s.key}"
            if not self.reader.has_record(name):
                raise NotLite(f"no entry {name}")
            off = self.reader.get_record_offset(name)
            if off + nbytes > self.size:
                raise NotLite(f"entry {name} past the end of the file")
            hit = self.storages[s.key] = (dtype, self.whole[off:off + nbytes])
        return hit

    def rebuild_tensor(self, storage, offset, size, stride, requires_grad=False, hooks=None, metadata=None):
        # torch._utils._rebuild_tensor_v2 with a plain CPU storage; metadata and hooks are left to torch
        if not isinstance(storage, lite._Storage) or hooks or metadata:
            raise NotLite("tensor with hooks, metadata or no plain storage")
        dtype, untyped = self.storage(storage)
        t = torch.empty((0,), dtype=dtype).set_(untyped, offset, size, stride)
        t.requires_grad = requires_grad
        t._backward_hooks = hooks
        return t

    @staticmethod
    def rebuild_parameter(data, requires_grad=False, hooks=None, state=None):
        if not isinstance(data, torch.Tensor) or hooks or state:
            raise NotLite("parameter with hooks or state")
        p = torch.nn.Parameter(data, requires_grad)
        p._backward_hooks = hooks
        return p


def load(path: Path):
    """What `torch.load(path, map_location="cpu", weights_only=True, mmap=True)` returns, or NotLite."""
    path = os.fspath(path)
    try:
        reader = torch._C.PyTorchFileReader(path)   # torch.load's own zip reader: the same entry offsets
    except Exception as e:  # noqa: BLE001 - not a zip torch reads: torch.load gives the verdict
        raise NotLite(f"{path}: {type(e).__name__}") from None
    if not reader.has_record("data.pkl") or reader.has_record("constants.pkl"):
        raise NotLite(f"{path}: not a plain torch.save file")
    if reader.has_record("byteorder") and bytes(reader.get_record("byteorder")) != b"little":
        raise NotLite(f"{path}: big-endian")
    size = os.path.getsize(path)
    shared = torch.serialization.get_default_mmap_options() == mmap.MAP_SHARED
    whole = torch.UntypedStorage.from_file(path, shared, size)
    u = _Unpickler(bytes(reader.get_record("data.pkl")), reader, whole, size)
    try:
        return u.load()
    except NotLite:
        raise
    except Exception as e:  # noqa: BLE001 - a pickle we cannot follow: torch decides what it is
        raise NotLite(f"{path}: {type(e).__name__}: {e}") from None
