"""Reading what `torch.save` wrote without importing torch (issue 13 item 5: `inspect` starts in well under a
second; importing torch takes one to three).

A `torch.save` file is a zip whose `<archive>/data.pkl` pickles the object; each tensor is a call of
`torch._utils._rebuild_tensor_v2` on a storage that the pickle names by a persistent id
`("storage", <torch.XStorage>, key, location, numel)`, its bytes the zip entry `<archive>/data/<key>`.
`load` unpickles `data.pkl` alone with an allow-list, mapping torch's rebuild functions and storage
classes to `TensorStub` (dtype, shape, the entry holding the bytes) and torch dtypes to `DType`:
no tensor byte is read and no global outside the list is ever called (checkpoints are untrusted).

Anything the list does not name, and any file that is not such a zip, raises `NotLite`: the caller then
reads the file with torch (`ckptctl.storage.pickles`), which refuses or accepts it as before. The list
is the one `pickles.safe_globals()` admits through `torch.load(weights_only=True)`, minus what inspect
never needs to be exact about (numpy's RNG arrays become `Opaque`).
"""
from __future__ import annotations

import argparse
import codecs
import collections
import io
import pickle
import zipfile
from dataclasses import dataclass
from pathlib import Path

from ckptctl.core.dtypes import itemsize
from ckptctl.storage.allow_list import _stand_in


class NotLite(Exception):
    """The torch-free reader cannot read this faithfully; read it with torch instead."""


@dataclass(frozen=True)
class DType:
    """A torch dtype by name; prints as torch's does (`torch.float32`), which is all inspect uses."""

    name: str

    def __str__(self):
        return f"torch.{self.name}"

    __repr__ = __str__


@dataclass(frozen=True)
class TensorStub:
    """A tensor of the file, undecoded: dtype, shape and the zip entry of its storage."""

    dtype: DType
    shape: tuple[int, ...]
    stride: tuple[int, ...]
    storage_offset: int
    key: str                   # `<archive>/data/<key>` holds the storage's bytes
    storage_numel: int


class Opaque:
    """A numpy object (Megatron's RNG state): kept as constructed, never interpreted."""

    def __init__(self, *args):
        self.args = args

    def __setstate__(self, state):
        self.state = state


# torch's typed storage classes as `torch.save` names them -> the dtype of their elements
_STORAGES = {"FloatStorage": "float32", "DoubleStorage": "float64", "HalfStorage": "float16",
             "BFloat16Storage": "bfloat16", "LongStorage": "int64", "IntStorage": "int32", "ShortStorage": "int16",
             "CharStorage": "int8", "ByteStorage": "uint8", "BoolStorage": "bool"}
_DTYPES = {"float32", "float64", "float16", "bfloat16", "int64", "int32", "int16", "int8", "uint8", "bool",
           "float8_e4m3fn", "float8_e5m2"}


@dataclass(frozen=True)
class _StorageClass:
    dtype: str


@dataclass(frozen=True)
class _Storage:
    dtype: str
    key: str
    numel: int


def _rebuild_tensor(storage, offset, size, stride, requires_grad=False, hooks=None, metadata=None):
    if not isinstance(storage, _Storage) or hooks:
        raise NotLite("tensor without a plain storage")
    return TensorStub(DType(storage.dtype), tuple(int(s) for s in size), tuple(int(s) for s in stride),
                      int(offset), storage.key, storage.numel)


def _rebuild_parameter(data, requires_grad=False, hooks=None, state=None):
    if not isinstance(data, TensorStub) or hooks or state:
        raise NotLite("parameter with hooks or state")
    return data


_NUMPY = {"_reconstruct", "ndarray", "dtype"}   # as pickles.safe_globals()
_GLOBALS = {
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
    ("torch", "Size"): tuple,
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("argparse", "Namespace"): argparse.Namespace,
    ("_io", "BytesIO"): io.BytesIO, ("io", "BytesIO"): io.BytesIO,
    ("_codecs", "encode"): codecs.encode,        # protocol-2 pickles write bytes as encode(str, "latin1")
    ("builtins", "set"): set,     # torch's weights_only loader admits set, not frozenset
}


class _Unpickler(pickle.Unpickler):
    def find_class(self, module, name):
        if module == "__builtin__":      # protocol 2 names Python 2's module (pickle's own find_class maps it)
            module = "builtins"
        hit = _GLOBALS.get((module, name))
        if hit is not None:
            return hit
        if module == "torch" and name in _STORAGES:
            return _StorageClass(_STORAGES[name])
        if module == "torch" and name in _DTYPES:
            return DType(name)
        if module.split(".")[0] == "numpy" and (name in _NUMPY or name.endswith("DType")) and \
                module in ("numpy", "numpy.dtypes", "numpy.core.multiarray", "numpy._core.multiarray"):
            return Opaque
        if module.startswith("megatron."):
            return _stand_in(f"{module}.{name}")   # the same stand-in as the torch path: equal reports
        raise NotLite(f"global {module}.{name}")

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"
                and isinstance(pid[1], _StorageClass)):
            raise NotLite(f"persistent id {str(pid)[:60]}")
        return _Storage(pid[1].dtype, str(pid[2]), int(pid[4]))


def loads(data: bytes):
    """Unpickle bytes that hold no tensors (DCP metadata, stored objects) with the same allow-list."""
    return _Unpickler(io.BytesIO(data)).load()


def load(path: Path, data: bytes | None = None):
    """The object of a `torch.save` zip file (or of its bytes `data`, `path` naming them), tensors as
    `TensorStub`. NotLite for anything else."""
    try:
        z = zipfile.ZipFile(path if data is None else io.BytesIO(data))
    except (zipfile.BadZipFile, OSError, ValueError) as e:
        raise NotLite(f"{path}: {e}") from None
    with z:
        infos = {i.filename: i for i in z.infolist()}
        pkl = [n for n in infos if n.endswith("/data.pkl") and n.count("/") == 1]
        if len(pkl) != 1:
            raise NotLite(f"{path}: no single <archive>/data.pkl")
        archive = pkl[0].split("/")[0]
        order = infos.get(f"{archive}/byteorder")
        if order is not None and z.read(order).strip() != b"little":
            raise NotLite(f"{path}: big-endian")
        try:
            obj = _Unpickler(io.BytesIO(z.read(pkl[0]))).load()
        except NotLite:
            raise
        except Exception as e:  # noqa: BLE001 - a pickle we cannot follow: torch decides what it is
            raise NotLite(f"{path}: {type(e).__name__}: {e}") from None
    _check_storages(obj, infos, archive, path)
    return obj


def _check_storages(obj, infos: dict, archive: str, path: Path) -> None:
    """Every tensor's storage is an entry of the zip, stored whole: a file torch would not load as it
    stands is left to torch (its error names the problem)."""
    for t in tensors(obj):
        info = infos.get(f"{archive}/data/{t.key}")
        if info is None or info.compress_type != zipfile.ZIP_STORED \
                or info.file_size < t.storage_numel * itemsize(t.dtype.name):
            raise NotLite(f"{path}: storage {t.key} missing or short")


def tensors(obj):
    """Every TensorStub inside plain containers (dicts, lists, tuples, Namespaces)."""
    stack = [obj]
    while stack:
        o = stack.pop()
        if isinstance(o, TensorStub):
            yield o
        elif isinstance(o, dict):
            stack.extend(o.values())
        elif isinstance(o, (list, tuple)):
            stack.extend(o)
        elif isinstance(o, argparse.Namespace):
            stack.extend(vars(o).values())
