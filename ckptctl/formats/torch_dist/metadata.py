"""Megatron-core's `torch_dist` format (PyTorch DCP underneath): finding a checkpoint, reading `.metadata`
safely, reading blobs (DESIGN §7).

    <root>/latest_checkpointed_iteration.txt
    <root>/iter_0000010/.metadata            pickled DCP Metadata: per key global size, dtype, chunks;
                                              per chunk the file, byte offset and length of its blob
    <root>/iter_0000010/__<w>_<n>.distcp     blobs: each tensor chunk is a `torch.save` of the chunk,
                                              each object the `torch.save` of a one-element list
    <root>/iter_0000010/metadata.json        {"sharded_backend": "torch_dist", ...}: marks a dist checkpoint

Common state (args, iteration, scheduler, `content_metadata`) is the object `common_state/shard_0_1`
(older checkpoints: `common.pt`). Layer tensors are stacked: `decoder.layers.<rest>` has a leading
global-layer axis; objects carry their grid in the name (`<key>/shard_<offsets>_<shape>`).

Reading needs no model class: `.metadata` goes through an unpickler that admits only DCP's metadata
classes, every blob through `torch.load(weights_only=True)`. The planning functions here are pure: they
map chunks onto the store's canonical per-layer arrays (and back) without touching files.
"""
from __future__ import annotations

import io
import json
import pickle
from dataclasses import dataclass, field
from pathlib import Path

from ckptctl.errors import BadInput, CkptctlError
from ckptctl.formats.megatron import TRACKER, args_dict, iter_dirname, layout_from_args
from ckptctl.layout import Layout
from ckptctl.storage.pickles import load_pt, loads_bytes

BACKEND = "torch_dist"
CONFIG = "metadata.json"
METADATA = ".metadata"
COMMON_KEY = "common_state"
COMMON_PT = "common.pt"
RNG_KEY = "rng_state"

# --- safe loading -------------------------------------------------------------------------------

_DCP = "torch.distributed.checkpoint."
_ALLOWED = {
    (_DCP + "metadata", n) for n in (
        "Metadata", "MetadataIndex", "ChunkStorageMetadata", "BytesStorageMetadata", "TensorProperties",
        "TensorStorageMetadata", "StorageMeta", "_MEM_FORMAT_ENCODING")
} | {
    (_DCP + "planner", n) for n in ("SavePlan", "WriteItem", "TensorWriteData", "WriteItemType")
} | {
    (_DCP + "filesystem", "_StorageInfo"), ("torch", "Size"), ("torch.serialization", "_get_layout"),
    ("collections", "OrderedDict"), ("builtins", "set"), ("builtins", "frozenset"),
}
# Classes older megatron-core releases pickled into .metadata; they carry no data we use.
_MCORE_STAND_INS = {("megatron.core.dist_checkpointing.strategies.torch", "MCoreMetadata"),
                    ("megatron.core.dist_checkpointing.strategies.torch", "MCoreSavePlan")}


class _Record:
    """Stand-in for an allowed DCP metadata class: keeps the pickled fields as attributes.

    Reading never imports `torch.distributed.checkpoint` (seconds of imports per process); the
    unpickled objects only need their fields.
    """

    def __init__(self, *args):               # enums are pickled as `cls(value)`
        self._args = args

    def __setstate__(self, state):
        if isinstance(state, tuple) and len(state) == 2 and isinstance(state[1], dict) \
                and (state[0] is None or isinstance(state[0], dict)):
            self.__dict__.update(state[0] or {})         # (dict, slots) form of object.__getstate__
            self.__dict__.update(state[1])
        elif isinstance(state, dict):
            self.__dict__.update(state)
        else:                                            # TensorProperties: (dtype, layout, ...)
            self._state = state
            if isinstance(state, tuple) and state and isinstance(state[0], self._dtype_class()):
                self.dtype = state[0]

    @staticmethod
    def _dtype_class() -> type:
        """What a pickled dtype unpickles to (inspect's torch-free reader: `lite_pickle.DType`)."""
        import torch   # here, not at the top: inspect's torch-free reader imports this module
        return torch.dtype


_records: dict[tuple[type, str], type] = {}


def _record(name: str, base: type = _Record) -> type:
    """The stand-in class of an allowed DCP class `name` (one per name and base)."""
    if (base, name) not in _records:
        _records[base, name] = type(name, (base,), {})
    return _records[base, name]


class _MetadataUnpickler(pickle.Unpickler):
    def __init__(self, f, path: Path):
        super().__init__(f)
        self.path = path

    def find_class(self, module, name):
        import torch
        if (module, name) in _ALLOWED or (module, name) in _MCORE_STAND_INS:
            if module.startswith(_DCP) or module.startswith("megatron."):
                return _record(name)
            return super().find_class(module, name)
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        raise BadInput(f"{self.path}: refusing to unpickle {module}.{name} (not a DCP metadata class)")


def load_metadata(path: Path):
    """The DCP `Metadata` object of `.metadata`, through the restricted unpickler."""
    path = Path(path)
    if not path.is_file():
        raise BadInput(f"missing {path} (a torch_dist checkpoint writes it last: the save did not finish)")
    try:
        with open(path, "rb") as f:
            md = _MetadataUnpickler(f, path).load()
    except CkptctlError:
        raise
    except Exception as e:  # noqa: BLE001 - any unpickling failure is a corrupt file
        raise BadInput(f"{path}: truncated or corrupt DCP metadata ({str(e).splitlines()[0][:120]})") from None
    if not hasattr(md, "state_dict_metadata") or not hasattr(md, "storage_data"):
        raise BadInput(f"{path}: not a DCP Metadata object")
    return md


def read_blob(iter_dir: Path, ref: list) -> bytes:
    """Bytes of one stored item: ref = [relative file, byte offset, length]."""
    path = Path(iter_dir) / ref[0]
    try:
        with open(path, "rb") as f:
            f.seek(ref[1])
            data = f.read(ref[2])
    except OSError as e:
        raise BadInput(f"missing or unreadable {path} ({e.strerror})") from None
    if len(data) != ref[2]:
        raise BadInput(f"{path}: truncated (item at byte {ref[1]} needs {ref[2]} bytes, {len(data)} left)")
    return data


def load_tensor(iter_dir: Path, ref: list, what: str) -> torch.Tensor:
    import torch
    try:
        return torch.load(io.BytesIO(read_blob(iter_dir, ref)), map_location="cpu", weights_only=True)
    except CkptctlError:
        raise
    except Exception as e:  # noqa: BLE001
        raise BadInput(f"{Path(iter_dir) / ref[0]}: chunk of {what!r} is corrupt ({str(e).splitlines()[0][:100]})") from None


def load_object(iter_dir: Path, ref: list, what: str):
    """A stored object: DCP keeps `torch.save([value])`; loaded with the legacy allow-list."""
    data = loads_bytes(read_blob(iter_dir, ref), f"{Path(iter_dir) / ref[0]}: {what}")
    if not isinstance(data, list) or len(data) != 1:
        raise BadInput(f"{Path(iter_dir) / ref[0]}: object {what!r} is not a one-element list")
    return data[0]


# --- discovery ----------------------------------------------------------------------------------

def _iter_dir(root: Path) -> tuple[int | str, Path] | None:
    root = Path(root)
    if (root / CONFIG).is_file():
        return "release", root
    tracker = root / TRACKER
    if tracker.is_file():
        text = tracker.read_text().strip()
        it = "release" if text == "release" else int(text) if text.isdigit() else None
        if it is not None and (root / iter_dirname(it) / CONFIG).is_file():
            return it, root / iter_dirname(it)
    return None


def is_torch_dist(root: Path) -> bool:
    found = _iter_dir(root)
    if found is None:
        return False
    try:
        return json.loads((found[1] / CONFIG).read_text()).get("sharded_backend") == BACKEND
    except (OSError, ValueError):
        return False


@dataclass
class DistCheckpoint:
    root: Path
    iteration: int | str
    iter_dir: Path
    layout: Layout
    args: dict
    common: dict
    index: dict = field(default_factory=dict)   # JSON-able: {"tensors", "objects", "order"}


def open_dist(root: Path) -> DistCheckpoint:
    """Find the iteration, read `.metadata` and the common state. No tensor is read."""
    root = Path(root)
    found = _iter_dir(root)
    if found is None:
        raise BadInput(f"{root}: not a torch_dist checkpoint (no {CONFIG})")
    iteration, it_dir = found
    cfg = json.loads((it_dir / CONFIG).read_text())
    if cfg.get("sharded_backend") != BACKEND:
        raise BadInput(f"{it_dir / CONFIG}: sharded_backend {cfg.get('sharded_backend')!r} is not supported "
                       f"(only {BACKEND})")
    md = load_metadata(it_dir / METADATA)
    index = index_of(md, it_dir / METADATA)
    check_files(it_dir, index)
    if (it_dir / COMMON_PT).is_file():
        common = load_pt(it_dir / COMMON_PT, mmap=False)
    else:
        ref = index["objects"].get(f"{COMMON_KEY}/shard_0_1")
        if ref is None:
            raise BadInput(f"{it_dir}: no common state ({COMMON_KEY} object or {COMMON_PT})")
        common = load_object(it_dir, ref, COMMON_KEY)
    if not isinstance(common, dict) or "args" not in common:
        raise BadInput(f"{it_dir}: the common state has no 'args'; cannot tell the model or layout")
    args = args_dict(common["args"])
    return DistCheckpoint(root, iteration, it_dir, layout_from_args(args), args, common, index)


def check_files(it_dir: Path, index: dict) -> None:
    """Every stored item must lie inside its file: a missing or truncated file is refused before any write."""
    need: dict[str, int] = {}
    for t in index["tensors"].values():
        for c in t["chunks"]:
            need[c[2]] = max(need.get(c[2], 0), c[3] + c[4])
    for ref in index["objects"].values():
        need[ref[0]] = max(need.get(ref[0], 0), ref[1] + ref[2])
    from ckptctl.paths import real
    for name, end in sorted(need.items()):
        path = it_dir / name
        if not path.is_file():
            raise BadInput(f"missing file {path} (named by {it_dir / METADATA})")
        if real(it_dir) not in real(path).parents:   # a symlink leading out of the checkpoint
            raise BadInput(f"{path} leads outside the checkpoint (to {real(path)}); refused")
        size = path.stat().st_size
        if size < end:
            raise BadInput(f"{path}: truncated ({size} bytes, the metadata needs {end})")


def index_of(md, where: Path) -> dict:
    """The JSON-able summary of DCP metadata: tensors with chunks and blob refs, objects, key order."""
    refs: dict[tuple, list] = {}
    for idx, info in md.storage_data.items():
        off = getattr(idx, "offset", None)
        off = tuple(int(x) for x in off) if off is not None else None
        if getattr(info, "transform_descriptors", None):
            raise BadInput(f"{where}: {idx.fqn!r} is stored with transforms {info.transform_descriptors} (unsupported)")
        rel = str(info.relative_path)
        if not rel or Path(rel).is_absolute() or ".." in Path(rel).parts:   # reads stay inside the checkpoint
            raise BadInput(f"{where}: entry {idx.fqn!r} names file {rel!r}, outside the checkpoint; refused")
        refs[(idx.fqn, off)] = [rel, int(info.offset), int(info.length)]
    tensors, objects, order = {}, {}, []
    for fqn, m in md.state_dict_metadata.items():
        order.append(fqn)
        if hasattr(m, "chunks"):
            dtype = str(getattr(m.properties, "dtype", None)).removeprefix("torch.")
            chunks = []
            for c in m.chunks:
                off = tuple(int(x) for x in c.offsets)
                ref = refs.get((fqn, off))
                if ref is None:
                    raise BadInput(f"{where}: chunk {list(off)} of {fqn!r} has no storage entry")
                chunks.append([list(off), [int(x) for x in c.sizes], *ref])
            tensors[fqn] = {"shape": [int(x) for x in m.size], "dtype": dtype, "chunks": chunks}
        else:
            ref = refs.get((fqn, None))
            if ref is None:
                raise BadInput(f"{where}: object {fqn!r} has no storage entry")
            objects[fqn] = ref
    return {"tensors": tensors, "objects": objects, "order": order}


