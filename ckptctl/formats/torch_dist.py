"""Megatron-core's `torch_dist` format (PyTorch DCP underneath), as a source and as a target (DESIGN §7).

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
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ckptctl.box import Box
from ckptctl.errors import BadInput, CkptctlError
from ckptctl.formats import legacy
from ckptctl.layout import FileCoord, Layout
from ckptctl.models.base import EXTRA_STATE, Family
from ckptctl.models.config import ModelConfig
from ckptctl.models.rules import VOCAB, Piece
from ckptctl.param_order import ModelOrder, sort_position
from ckptctl.reshard.plan import MODEL, FilePlan, Namer, ObjectItem, SourcePlan, TensorItem, _sort_key, _strip_expert
from ckptctl.store import chunk_shape, storage_dtype

FORMAT = "torch_dist"
CONFIG = "metadata.json"
METADATA = ".metadata"
COMMON_KEY = "common_state"
COMMON_PT = "common.pt"
RNG_KEY = "rng_state"
# Optimizer state (`optimizer.state...`, `optimizer.distributed...`, `chained_<i>.`) is not part of the
# weight plan: `torch_dist_optim` converts it (forms it does not know are dropped and reported); the
# per-rank state of an in-flight rerun is dropped and reported.
DROPPED_PREFIXES = ("optimizer", "chained_", "rerun_state_machine_state")
# Local (non-TE) specs rename their norms to the fused TE names in sharded state dicts (mcore's
# `sharded_state_dict_keys_map`); the legacy files keep the local names.
LOCAL_ALIASES = (("input_layernorm.", "self_attention.linear_qkv.layer_norm_"),
                 ("pre_mlp_layernorm.", "mlp.linear_fc1.layer_norm_"))

# Names megatron-core keeps in sharded state dicts for every spec: Mamba's conv1d parameters under
# their pre-0.19 module names (the legacy files of 0.19.2 say `conv1d_weight`).
DIST_NAMES = (("mixer.conv1d_", "mixer.conv1d."),)
# Routed experts: SequentialMLP and TEGroupedMLP save the same keys, `mlp.experts.experts.linear_fc1.weight`
# (mcore keeps the two interchangeable), experts on an axis after the layer axis; one `_extra_state`
# object per (layer, expert).
_DIST_EXPERT = re.compile(r"^mlp\.experts\.experts\.(?P<lin>linear_fc[12])\.(?P<p>weight|bias|_extra_state)$")
_EXPERT_ARRAY = re.compile(r"^mlp\.experts\.(?P<rest>linear_fc[12]\.(weight|bias|_extra_state))$")
_STACKED = re.compile(r"^(?P<stack>[a-z_]+)\.layers\.(?P<rest>[^\d].*)$")
_SHARD = re.compile(r"^(?P<key>.+)/shard_(?P<offs>[\d.]*)_(?P<shape>[\d.]*)$")

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
            if isinstance(state, tuple) and state and isinstance(state[0], torch.dtype):
                self.dtype = state[0]


_records: dict[str, type] = {}


def _record(name: str) -> type:
    if name not in _records:
        _records[name] = type(name, (_Record,), {})
    return _records[name]


class _MetadataUnpickler(pickle.Unpickler):
    def __init__(self, f, path: Path):
        super().__init__(f)
        self.path = path

    def find_class(self, module, name):
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
    try:
        return torch.load(io.BytesIO(read_blob(iter_dir, ref)), map_location="cpu", weights_only=True)
    except CkptctlError:
        raise
    except Exception as e:  # noqa: BLE001
        raise BadInput(f"{Path(iter_dir) / ref[0]}: chunk of {what!r} is corrupt ({str(e).splitlines()[0][:100]})") from None


def load_object(iter_dir: Path, ref: list, what: str):
    """A stored object: DCP keeps `torch.save([value])`; loaded with the legacy allow-list."""
    data = legacy.loads_bytes(read_blob(iter_dir, ref), f"{Path(iter_dir) / ref[0]}: {what}")
    if not isinstance(data, list) or len(data) != 1:
        raise BadInput(f"{Path(iter_dir) / ref[0]}: object {what!r} is not a one-element list")
    return data[0]


# --- discovery ----------------------------------------------------------------------------------

def _iter_dir(root: Path) -> tuple[int | str, Path] | None:
    root = Path(root)
    if (root / CONFIG).is_file():
        return "release", root
    tracker = root / legacy.TRACKER
    if tracker.is_file():
        text = tracker.read_text().strip()
        it = "release" if text == "release" else int(text) if text.isdigit() else None
        if it is not None and (root / legacy.iter_dirname(it) / CONFIG).is_file():
            return it, root / legacy.iter_dirname(it)
    return None


def is_torch_dist(root: Path) -> bool:
    found = _iter_dir(root)
    if found is None:
        return False
    try:
        return json.loads((found[1] / CONFIG).read_text()).get("sharded_backend") == FORMAT
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
    if cfg.get("sharded_backend") != FORMAT:
        raise BadInput(f"{it_dir / CONFIG}: sharded_backend {cfg.get('sharded_backend')!r} is not supported "
                       f"(only {FORMAT})")
    md = load_metadata(it_dir / METADATA)
    index = index_of(md, it_dir / METADATA)
    check_files(it_dir, index)
    if (it_dir / COMMON_PT).is_file():
        common = legacy.load_pt(it_dir / COMMON_PT, mmap=False)
    else:
        ref = index["objects"].get(f"{COMMON_KEY}/shard_0_1")
        if ref is None:
            raise BadInput(f"{it_dir}: no common state ({COMMON_KEY} object or {COMMON_PT})")
        common = load_object(it_dir, ref, COMMON_KEY)
    if not isinstance(common, dict) or "args" not in common:
        raise BadInput(f"{it_dir}: the common state has no 'args'; cannot tell the model or layout")
    args = legacy.args_dict(common["args"])
    return DistCheckpoint(root, iteration, it_dir, legacy.layout_from_args(args), args, common, index)


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


# --- key mapping (pure) -------------------------------------------------------------------------

def spec_of(args: dict) -> str:
    """Which names the legacy files of this run use: "local" or "te" (Megatron-LM's --transformer-impl)."""
    return "local" if args.get("transformer_impl") == "local" else "te"


def to_store_rest(rest: str, spec: str) -> str:
    """A DCP layer-key rest -> the name legacy files of `spec` use (the store keeps those)."""
    for legacy_name, dist_name in DIST_NAMES:
        if rest.startswith(dist_name):
            return legacy_name + rest[len(dist_name):]
    if spec == "local":
        for local, te in LOCAL_ALIASES:
            if rest.startswith(te):
                return local + rest[len(te):]
    return rest


def to_dist_rest(rest: str) -> str:
    for local, te in LOCAL_ALIASES:
        if rest.startswith(local):
            return te + rest[len(local):]
    return rest


def dist_rest(rest: str, local: bool) -> str:
    """A legacy layer-key rest (expert-free) -> megatron-core's sharded name (`local`: a local-spec model,
    whose norms all take the fused TE names, those of MoE layers included)."""
    for legacy_name, dist_name in DIST_NAMES:
        if rest.startswith(legacy_name):
            return dist_name + rest[len(legacy_name):]
    m = _EXPERT_ARRAY.match(rest)
    if m:
        return "mlp.experts.experts." + m["rest"]
    return to_dist_rest(rest) if local else rest


def is_local_spec(gkeys) -> bool:
    """Whether legacy keys come from a local (non-TE) spec: its attention has a separate input norm. A TE
    spec fuses it into `linear_qkv` and keeps MoE layers' `pre_mlp_layernorm` under its own name."""
    return any(re.search(r"\.layers\.\d+\.input_layernorm\.", k) for k in gkeys)


def expert_keys(gkey: str, cfg: ModelConfig) -> list[str] | None:
    """The legacy global keys of experts 0..E-1 behind a DCP expert key at one layer, or None.

    The legacy kind follows `args.moe_grouped_gemm`: SequentialMLP `local_experts.<g>.linear_fc1.weight`,
    TEGroupedMLP `linear_fc1.weight<g>` (and its single `linear_fc1._extra_state`)."""
    m = re.match(r"^(?P<pre>[a-z_]+\.layers\.\d+\.)(?P<rest>.+)$", gkey)
    e = _DIST_EXPERT.match(m["rest"]) if m else None
    if e is None:
        return None
    lin, p, n = e["lin"], e["p"], cfg.num_experts
    if cfg.extra.get("moe_grouped_gemm"):
        return [m["pre"] + (f"mlp.experts.{lin}.{p}" + ("" if p == EXTRA_STATE else str(g))) for g in range(n)]
    return [m["pre"] + f"mlp.experts.local_experts.{g}.{lin}.{p}" for g in range(n)]


def segment_of(family: Family, cfg: ModelConfig, gkey: str) -> tuple[str, str]:
    """(legacy key, array suffix) of a DCP key naming one segment of a segmented tensor (Mamba's
    `in_proj.weight.z`, mcore's ShardedTensorFactory split); (gkey, "") for any other key."""
    from ckptctl.errors import UnknownKey
    from ckptctl.models.rules import SEGMENTS
    base, dot, name = gkey.rpartition(".")
    if not dot or not base.count("."):
        return gkey, ""
    try:
        loc = family.locate(base)
        rule = family.rule(_strip_expert(family, loc), cfg)
    except (UnknownKey, BadInput):
        return gkey, ""
    if rule.kind == SEGMENTS and "." + name in {sfx for sfx, _ in rule.segments}:
        return base, "." + name
    return gkey, ""


def split_fqn(fqn: str) -> tuple[str | None, str]:
    """(stack, rest) of a layer-stacked DCP key, or (None, fqn)."""
    m = _STACKED.match(fqn)
    return (m["stack"], m["rest"]) if m else (None, fqn)


def store_key(fqn: str, layer: int | None, spec: str) -> str:
    """The store's global key of a DCP key (at `layer` when stacked); numbered keys only get aliases."""
    stack, rest = split_fqn(fqn)
    if stack is not None:
        return f"{stack}.layers.{layer}.{to_store_rest(rest, spec)}"
    m = re.match(r"^([a-z_]+\.layers\.\d+\.)(.+)$", fqn)
    if m:
        return m.group(1) + to_store_rest(m.group(2), spec)
    return fqn


def parse_shard(name: str) -> tuple[str, tuple[int, ...], tuple[int, ...]]:
    m = _SHARD.match(name)
    if not m:
        raise BadInput(f"DCP object {name!r}: expected '<key>/shard_<offsets>_<shape>'")
    ints = lambda s: tuple(int(x) for x in s.split(".")) if s else ()  # noqa: E731
    return m["key"], ints(m["offs"]), ints(m["shape"])


# --- source planning (pure) ---------------------------------------------------------------------

OBJECTS_UNIT = "objects"


def plan_source(family: Family, cfg: ModelConfig, layout: Layout, index: dict, spec: str) -> SourcePlan:
    """The SourcePlan of a torch_dist checkpoint: unit 0 holds every object, then one unit per tensor chunk.

    Each chunk's pieces map it onto per-layer store arrays (the stacked layer axis dropped); every chunk
    is written to the store by exactly one worker (DCP keeps main replicas only, so chunks are disjoint).
    """
    namer = Namer(family, cfg, layout)
    copies = family.tied_copies(cfg)
    stacks = family.stack_layers(cfg)
    tensors, order = index["tensors"], index["order"]
    position: dict[str, int] = {}           # first appearance of each key (objects: without /shard_..)
    for i, name in enumerate(order):
        position.setdefault(name if name in tensors else name.split("/shard_")[0], i)
    arrays: dict[str, dict] = {}
    boxes: dict[str, list[Box]] = {}
    manifest: dict[str, dict] = {}
    sort: dict[str, tuple] = {}
    groups: dict = {}
    units: list[FilePlan] = [FilePlan(FileCoord(0, 0), OBJECTS_UNIT, ())]
    slots: dict[str, int] = {}

    # The manifest's order becomes every rank file's parameter order, hence the optimizer's buffer layout:
    # it comes from the model (param_order), never from `.metadata`, whose key order follows how the
    # ranks' write plans were merged (`pos`: only for keys the model rules cannot place, i.e. objects).
    model_order = ModelOrder(family, cfg)

    def note(gkey, loc, kind, pos, dtype=None):
        if gkey not in manifest:
            manifest[gkey] = {"gkey": gkey, "kind": kind, **({"dtype": dtype} if dtype else {})}
            ex = family.expert_of(loc.rest)
            at = sort_position(model_order, gkey, pos, len(order))
            sort[gkey] = _sort_key(loc, None if ex is None else ex[1], at, family, groups)

    for fqn in order:
        if fqn not in tensors or fqn.startswith(DROPPED_PREFIXES):
            continue
        t = tensors[fqn]
        shape, dtype = tuple(t["shape"]), t["dtype"]
        storage_dtype(dtype)
        stack, _ = split_fqn(fqn)
        if stack is not None:
            if stack not in stacks:
                raise BadInput(f"torch_dist key {fqn!r}: unknown layer stack {stack!r}")
            if not shape or shape[0] != stacks[stack]:
                raise BadInput(f"torch_dist key {fqn!r}: layer axis {shape[:1]} but the model has "
                               f"{stacks[stack]} {stack} layers")
            # only the layers that hold this key have chunks (a sparse stack)
            layers = sorted({lay for off, sizes, *_ in t["chunks"] for lay in range(off[0], off[0] + sizes[0])})
            ashape = shape[1:]
        else:
            layers, ashape = [None], shape
        names = {}
        for lay in layers:
            gkey = store_key(fqn, lay, spec)
            gkeys = expert_keys(gkey, cfg)
            if gkeys is not None and (not ashape or ashape[0] != cfg.num_experts):
                raise BadInput(f"torch_dist key {fqn!r}: expert axis {ashape[:1]} but the model has "
                               f"{cfg.num_experts} experts")
            gkey, suffix = segment_of(family, cfg, gkey if gkeys is None else gkeys[0])
            loc = family.locate(gkey)
            family.rule(_strip_expert(family, loc), cfg)       # unknown names are refused here
            if gkey in copies:
                continue
            base = namer.array_of(loc)[0] + suffix
            names[lay] = base
            arrays[base] = {"shape": list(ashape), "dtype": dtype,
                            "vocab": family.rule(_strip_expert(family, loc), cfg).kind == VOCAB}
            boxes[base] = []
            for k in gkeys or [gkey]:
                note(k, family.locate(k), "tensor", position[fqn], dtype)
        if not names:
            continue
        for off, sizes, fname, boff, blen in t["chunks"]:
            # One item per layer of the chunk: its tensor is the chunk's slice at that layer, so local
            # tensors have the store array's rank (readers index the stacked chunk).
            items = []
            for lay in (range(off[0], off[0] + sizes[0]) if stack is not None else [None]):
                lsizes, goffs = (sizes[1:], off[1:]) if stack is not None else (sizes, off)
                gbox = Box(tuple(goffs), tuple(lsizes))
                for b in boxes[names[lay]]:
                    if b.intersect(gbox) is not None:
                        raise BadInput(f"torch_dist key {fqn!r}: chunk at {off} overlaps another chunk")
                boxes[names[lay]].append(gbox)
                piece = Piece(Box.full(lsizes), names[lay], gbox)
                key = json.dumps([off, None if lay is None else lay - off[0]])
                items.append(TensorItem(fqn, key, store_key(fqn, lay, spec), dtype, tuple(lsizes), (piece,), (True,)))
            units.append(FilePlan(FileCoord(0, 0), f"{fname}@{boff}", (fqn,), items))

    for a, spec_ in arrays.items():
        vol = 1
        for s in spec_["shape"]:
            vol *= s
        got = sum(b.volume for b in boxes[a])
        if got != vol:
            raise BadInput(f"tensor {a.removeprefix(MODEL)!r}: the torch_dist chunks cover {got} of its {vol} elements")
        spec_["chunks"] = list(chunk_shape(tuple(spec_["shape"]), boxes[a], _itemsize(spec_["dtype"])))

    for name in order:
        if name in tensors:
            continue
        if name.startswith(COMMON_KEY + "/") or name.startswith(RNG_KEY + "/"):
            continue                            # read by the objects unit's common() and rng()
        key, offs, shape = parse_shard(name)
        if not key.endswith(EXTRA_STATE):
            if key.startswith(DROPPED_PREFIXES):
                continue
            raise BadInput(f"torch_dist object {name!r}: unknown (no policy carries it)")
        stack, _ = split_fqn(key)
        gkey = store_key(key, offs[0] if stack is not None else None, spec)
        gkeys = expert_keys(gkey, cfg)
        if gkeys is not None:
            gkey = gkeys[offs[1 if stack is not None else 0]]
            if cfg.extra.get("moe_grouped_gemm"):
                # TEGroupedMLP's one state per linear is not mcore's per-expert split: not carried
                note(gkey, family.locate(gkey), "object", position[key])
                continue
        loc = family.locate(gkey)
        slot = f"{gkey}|{FORMAT}|0"
        units[0].items.append(ObjectItem(name, name, gkey, slot))
        slots[slot] = 0
        note(gkey, loc, "object", position[key])
    # Objects the legacy format has and torch_dist leaves out (values: the encoding's empty value).
    for key in family.dist_absent:
        if key not in manifest and key in _fresh_objects(family, cfg):
            note(key, family.locate(key), "object", len(order))
    ordered = [manifest[k] for k in sorted(manifest, key=lambda k: sort[k])]
    return SourcePlan(arrays=arrays, files=units, manifest=ordered, slots=slots)


def _fresh_objects(family: Family, cfg: ModelConfig) -> set[str]:
    try:
        return {k for k, s in family.global_keys(cfg) if s is None}
    except NotImplementedError:
        return set()


def _itemsize(dtype: str) -> int:
    import numpy as np
    return np.dtype(storage_dtype(dtype)).itemsize


def rng_slot(name: str, layout: Layout) -> str:
    """`rng_state/shard_<pp>.<tp>_<PP>.<TP>` -> the store slot of the legacy directory of that rank."""
    _, offs, _ = parse_shard(name)
    pp, tp = (offs + (0, 0))[:2]
    return "rng@" + FileCoord(tp=tp, pp=pp).dirname(layout)


# --- reading units (worker side) ----------------------------------------------------------------

class DistUnit:
    """One unit of a torch_dist source plan, read on demand (blobs, never whole files)."""

    def __init__(self, iter_dir: Path, index: dict, layout: Layout, fp: FilePlan):
        self.iter_dir, self.index, self.layout, self.fp = Path(iter_dir), index, layout, fp

    def tensor(self, t: TensorItem) -> torch.Tensor:
        """The item's tensor: the stored chunk, or its slice at one layer of a stacked chunk."""
        off, layer = json.loads(t.key)
        if getattr(self, "_last", (None,))[0] != (t.chunk, off):
            self._last = ((t.chunk, off), self._read(t, off))
        x = self._last[1]
        return x if layer is None else x[layer]

    def _read(self, t: TensorItem, off: list) -> torch.Tensor:
        for c in self.index["tensors"][t.chunk]["chunks"]:
            if c[0] == off:
                x = load_tensor(self.iter_dir, c[2:], t.chunk)
                if tuple(x.shape) != tuple(c[1]) or str(x.dtype).removeprefix("torch.") != t.dtype:
                    raise BadInput(f"{self.iter_dir / c[2]}: chunk {off} of {t.chunk!r} holds {x.dtype} "
                                   f"{tuple(x.shape)}, the metadata says {t.dtype} {tuple(c[1])}")
                return x
        raise BadInput(f"{self.iter_dir}: no chunk {off} of {t.chunk!r}")

    def object(self, o: ObjectItem):
        return load_object(self.iter_dir, self.index["objects"][o.chunk], o.chunk)

    def rng(self) -> dict:
        if self.fp.dirname != OBJECTS_UNIT:
            return {}
        return {rng_slot(n, self.layout): load_object(self.iter_dir, r, n)
                for n, r in self.index["objects"].items() if n.startswith(RNG_KEY + "/")}

    def common(self) -> dict:
        ref = self.index["objects"].get(f"{COMMON_KEY}/shard_0_1")
        common = load_object(self.iter_dir, ref, COMMON_KEY) if ref else legacy.load_pt(self.iter_dir / COMMON_PT, mmap=False)
        return common_for_store(common)

    def dropped(self) -> list[str]:
        return dropped_keys(self.index)


def common_for_store(common: dict) -> dict:
    """The common state's entries the store keeps (same policies as legacy top-level keys)."""
    out = {}
    for k, v in common.items():
        pol = legacy.TOP_LEVEL_POLICY.get(k)
        if pol in ("copy", "rewrite"):
            out[k] = v
    return out


def dropped_keys(index: dict) -> list[str]:
    out = []
    if any(n.startswith(("optimizer", "chained_")) for n in index["order"]):
        out.append("optimizer")
    if any(n.startswith("rerun_state_machine_state") for n in index["order"]):
        out.append("rerun_state_machine_state")
    return out


# --- inspect (parent process) -------------------------------------------------------------------

# Common-state keys besides the legacy top-level ones: recreated by the writer for the target.
DIST_COMMON_POLICY = {"content_metadata": "format"}


def inspect(src: Path, true_vocab: int | None = None, family: str | None = None):
    """`convert.inspect` for a torch_dist checkpoint: metadata, common state and the source plan."""
    from ckptctl.convert import Source
    from ckptctl.models import detect_family, get_family
    from ckptctl.models.config import config_from_args

    ck = open_dist(src)
    spec = spec_of(ck.args)
    keys = [store_key(f, 0, spec) for f in ck.index["tensors"]]
    fam_name = family or detect_family(keys, ck.args)
    fam = get_family(fam_name)
    cfg = config_from_args(ck.args, fam_name, true_vocab)
    fam.validate(cfg, ck.layout)
    plan = plan_source(fam, cfg, ck.layout, ck.index, spec)
    if cfg.padded_vocab is None:
        emb = plan.arrays.get(MODEL + "embedding.word_embeddings.weight")
        if emb:
            cfg = ModelConfig(**{**cfg.__dict__, "padded_vocab": emb["shape"][0]})
    policies = {}
    for k in ck.common:
        pol = legacy.TOP_LEVEL_POLICY.get(k) or DIST_COMMON_POLICY.get(k)
        if pol is None:
            raise BadInput(f"{ck.iter_dir}: unknown common-state key {k!r} (no policy carries it)")
        policies[k] = pol
    if any(n.startswith(RNG_KEY + "/") for n in ck.index["objects"]):
        policies[RNG_KEY] = "rng"
    for k in dropped_keys(ck.index):
        policies[k] = "optimizer" if k == "optimizer" else "dropped"
    dist = {"iter_dir": str(ck.iter_dir), "spec": spec, "index": ck.index}
    from ckptctl.formats import torch_dist_optim
    info = torch_dist_optim.inspect_info(ck, cfg, ck.layout)
    return Source(ck, fam_name, cfg, [], plan, policies, fmt=FORMAT, dist=dist, optim=info)


# --- target planning (pure) ---------------------------------------------------------------------

# What megatron-core 0.19.2's GPT models record as content metadata for weights-only saves.
CONTENT_METADATA = {"singleton_local_shards": False, "chained_optim_avoid_prefix": True}


@dataclass(frozen=True)
class DistChunk:
    """One chunk of a target DCP tensor: its box in the (stacked) global tensor and where its bytes come from."""

    fqn: str
    gshape: tuple[int, ...]
    offsets: tuple[int, ...]
    sizes: tuple[int, ...]
    dtype: str
    parts: tuple[Piece, ...]        # local box inside the chunk <- store array box; the rest is zero

    @property
    def nbytes(self) -> int:
        v = 1
        for s in self.sizes:
            v *= s
        return v * _itemsize(self.dtype)

    def tensor(self, store) -> torch.Tensor:
        """The chunk's bytes, read from the store (zeros where no part covers it)."""
        from ckptctl.store import torch_dtype
        vol = 1
        for s in self.sizes:
            vol *= s
        covered = sum(p.local.volume for p in self.parts)
        t = (torch.empty if covered == vol else torch.zeros)(self.sizes, dtype=torch_dtype(self.dtype))
        for p in self.parts:
            t[p.local.slices] = store.read(p.array, p.gbox).reshape(p.local.sizes)
        return t


@dataclass
class DistTarget:
    chunks: list[DistChunk]
    objects: list[tuple[str, str, str]]       # (DCP object name, store gkey, target slot)
    local_names: bool                         # the store holds local-spec norm names
    order: list[str] = field(default_factory=list)   # tensor keys and object names, state-dict order


def plan_target(family: Family, cfg: ModelConfig, layout: Layout, manifest: list[dict], arrays: dict[str, dict],
                slots: set[str]) -> DistTarget:
    """The chunks megatron-core would save at `layout`: each rank's main-replica shards, per layer.

    Derived from the legacy target plan (the same pieces): every local tensor is one chunk, except
    segmented tensors (GLU fc1), whose segments are separate chunks as in mcore's sharded state dict.
    Tied copies are replicas of the embedding key and are not written.
    """
    from ckptctl.models.rules import SEGMENTS
    from ckptctl.reshard.plan import plan_target as legacy_target

    files = legacy_target(family, cfg, layout, manifest, arrays, slots)
    namer = Namer(family, cfg, layout)
    copies = family.tied_copies(cfg)
    stacks = family.stack_layers(cfg)
    seen: set[tuple] = set()
    chunks: list[DistChunk] = []
    objects: dict[str, tuple[str, str, str]] = {}
    order: dict[str, None] = {}
    experts = cfg.num_experts
    local_names = is_local_spec(e["gkey"] for e in manifest)
    stacked = family.dist_stacked(cfg)
    for fp in files:
        for item in fp.items:
            loc = family.locate(item.gkey)
            ex = family.expert_of(loc.rest)
            rest = _strip_expert(family, loc).rest
            if loc.section == "layer":
                if stacked:
                    fqn = f"{loc.stack}.layers.{dist_rest(rest, local_names)}"
                    pre_off, pre_shape = (loc.layer,), (stacks[loc.stack],)
                else:
                    fqn, pre_off, pre_shape = f"{loc.stack}.layers.{loc.layer}.{dist_rest(rest, local_names)}", (), ()
            else:
                fqn, pre_off, pre_shape = rest, (), ()
            if ex is not None:                              # the expert axis follows the layer axis
                pre_off, pre_shape = pre_off + (ex[1],), pre_shape + (experts,)
            if isinstance(item, ObjectItem):
                if item.gkey in family.dist_absent:
                    continue
                # TEGroupedMLP's one state per linear: mcore splits it per expert; written empty
                grouped = ex is None and loc.section == "layer" and _EXPERT_ARRAY.match(rest)
                per = experts // layout.ep if grouped else 0
                for g in (range(fp.coord.ep * per, (fp.coord.ep + 1) * per) if grouped else [None]):
                    off, shp = (pre_off, pre_shape) if g is None else (pre_off + (g,), pre_shape + (experts,))
                    name = f"{fqn}/shard_{'.'.join(map(str, off)) or 0}_{'.'.join(map(str, shp)) or 1}"
                    if name not in objects:                 # mcore keeps (E)TP rank 0's extra state
                        objects[name] = (name, item.gkey, None if grouped else item.slot)
                        order.setdefault(name)
                continue
            if item.gkey in copies and not family.dist_saves_copies:
                continue
            rule = family.rule(_strip_expert(family, loc), cfg)
            n, r = namer.split(rule, fp.coord)
            shape = tuple(item.shape)
            if rule.kind == SEGMENTS:
                # one DCP key per array (Mamba's `.z` ... `.dt`), GLU's two row blocks in one key
                base, elead = namer.array_of(loc)[0], 1 if ex is not None else 0
                boxes = []
                for p in item.pieces:
                    gbox = Box(p.gbox.offsets[elead:], p.gbox.sizes[elead:])
                    boxes.append((fqn + p.array[len(base):], tuple(arrays[p.array]["shape"][elead:]), gbox,
                                  (Piece(Box.full(gbox.sizes), p.array, p.gbox),)))
            else:
                offs, gshape = [0] * len(shape), list(shape)
                if n > 1:
                    offs[rule.dim] = r * shape[rule.dim]
                    gshape[rule.dim] *= n
                boxes = [(fqn, tuple(gshape), Box(tuple(offs), shape), item.pieces)]
            for key, gshape, box, parts in boxes:
                order.setdefault(key)
                if (key, pre_off + box.offsets) in seen:
                    continue
                seen.add((key, pre_off + box.offsets))
                lead = len(pre_off)
                parts = tuple(Piece(Box((0,) * lead + p.local.offsets, (1,) * lead + p.local.sizes), p.array, p.gbox)
                              for p in parts)
                chunks.append(DistChunk(key, pre_shape + gshape, pre_off + box.offsets,
                                        (1,) * lead + box.sizes, item.dtype, parts))
    return DistTarget(chunks, list(objects.values()), local_names, list(order))


def target_common(common: dict, layout: Layout, padded: int | None, num_layers: int, local_names: bool) -> dict:
    """The common state a Megatron-LM run at `layout` would save with ckpt_format torch_dist."""
    import argparse
    out = dict(common)
    if "args" in out:
        a = legacy.rewrite_args(legacy.args_dict(out["args"]), layout, padded, num_layers)
        a["ckpt_format"] = FORMAT
        if local_names:
            a["transformer_impl"] = "local"
        out["args"] = argparse.Namespace(**a)
    out["content_metadata"] = dict(CONTENT_METADATA)
    return out


# --- target phase (workers) ---------------------------------------------------------------------

def _blob(value) -> bytes:
    return legacy.dumps_bytes(value)


def target_phase(job, comm, progress) -> dict:
    """Write the torch_dist checkpoint: per-worker .distcp files, then (rank 0) .metadata, metadata.json."""
    from ckptctl.reshard.comm import assign
    from ckptctl.formats import torch_dist_optim
    from ckptctl.reshard.run import COMMON, empty_like_encoding, get_object, open_target, rng_for

    store, attrs, family, cfg, src_layout, dst, encs = open_target(job)
    plan = plan_target(family, cfg, dst, attrs["manifest"], attrs["arrays"], set(encs))
    extra = torch_dist_optim.target_additions(job, store, attrs, family, cfg, dst, encs, plan.chunks)
    if extra is not None:
        plan.chunks += extra.chunks
    iteration = attrs.get("iteration", "release")
    it_dir = Path(job.out) / legacy.iter_dirname(iteration)
    it_dir.mkdir(parents=True, exist_ok=True)
    mine = assign([c.nbytes + 1 for c in plan.chunks], comm.world)[comm.rank]
    fname = f"__{comm.rank}_0.distcp"
    records = []
    with open(it_dir / fname, "wb") as f:
        def put(name, offsets, data: bytes):
            records.append((name, offsets, fname, f.tell(), len(data)))
            f.write(data)

        for i in mine:
            c = plan.chunks[i]
            t = c.tensor(store)
            buf = io.BytesIO()
            torch.save(t, buf)
            put(c.fqn, list(c.offsets), buf.getvalue())
            progress.add(c.nbytes)
        if comm.rank == 0:
            for name, gkey, slot in plan.objects:
                own = f"{gkey}|{FORMAT}|0"
                if slot in encs or own in encs:
                    s = slot if slot in encs else own
                    value = get_object(store, s, encs[s])
                else:
                    sample = next((s for s in encs if s.startswith(gkey + "|")), None)
                    value = empty_like_encoding(get_object(store, sample, encs[sample]) if sample else None)
                put(name, None, _blob([value]))
            for pp in range(dst.pp):
                for tp in range(dst.tp):
                    fc = FileCoord(tp=tp, pp=pp)
                    slot = rng_for(job.rng, src_layout, dst, FilePlan(fc, fc.dirname(dst), ()), encs)
                    if slot is not None and encs[slot] != "none":    # a source saved without RNG: none
                        put(f"{RNG_KEY}/shard_{pp}.{tp}_{dst.pp}.{dst.tp}", None, _blob([get_object(store, slot, encs[slot])]))
            common = get_object(store, COMMON, encs.get(COMMON, "none")) or {}
            padded = cfg.vocab_for_tp(dst.tp) if cfg.true_vocab is not None else cfg.padded_vocab
            common = target_common(common, dst, padded, cfg.num_layers, plan.local_names)
            if extra is not None:
                for name, value in extra.objects:
                    put(name, None, _blob([value]))
                common = extra.common(common)
            put(f"{COMMON_KEY}/shard_0_1", None, _blob([common]))
        f.flush()
        import os
        os.fsync(f.fileno())
    progress.add(0, force=True)
    gathered = comm.all_gather_object(records)
    if comm.rank == 0:
        write_metadata(it_dir, plan, [r for g in gathered for r in g])
        (it_dir / CONFIG).write_text(json.dumps({"sharded_backend": FORMAT, "sharded_backend_version": 1}))
        legacy.write_tracker(Path(job.out), iteration)
    comm.barrier()
    return {"files": comm.world, "bytes": sum(c.nbytes for c in plan.chunks)}


def write_metadata(it_dir: Path, plan: DistTarget, records: list) -> None:
    """The DCP `Metadata` (pickled, as torch's FileSystemWriter does), written last and renamed into place."""
    import os
    import uuid

    from torch.distributed.checkpoint.filesystem import _StorageInfo
    from torch.distributed.checkpoint.metadata import (BytesStorageMetadata, ChunkStorageMetadata, Metadata,
                                                       MetadataIndex, StorageMeta, TensorProperties,
                                                       TensorStorageMetadata)
    from ckptctl.store import torch_dtype

    sdm: dict = {name: None for name in plan.order}     # state-dict order, as a save would list it
    for c in plan.chunks:
        m = sdm.get(c.fqn)
        if m is None:
            m = sdm[c.fqn] = TensorStorageMetadata(TensorProperties(dtype=torch_dtype(c.dtype)), torch.Size(c.gshape), [])
        elif tuple(m.size) != c.gshape:
            raise CkptctlError(f"torch_dist writer: {c.fqn!r} planned with two global shapes")
        m.chunks.append(ChunkStorageMetadata(torch.Size(c.offsets), torch.Size(c.sizes)))
    storage = {}
    for name, offsets, fname, off, length in records:
        if offsets is None:
            sdm[name] = BytesStorageMetadata()
            storage[MetadataIndex(name)] = _StorageInfo(fname, off, length)
        else:
            storage[MetadataIndex(name, torch.Size(offsets))] = _StorageInfo(fname, off, length)
    written = {(n, tuple(o)) for n, o, *_ in records if o is not None}
    missing = [(c.fqn, c.offsets) for c in plan.chunks if (c.fqn, c.offsets) not in written]
    if missing:
        raise CkptctlError(f"torch_dist writer: {len(missing)} chunks were not written (first: {missing[0]})")
    sdm = {k: v for k, v in sdm.items() if v is not None}
    md = Metadata(state_dict_metadata=sdm, planner_data=None, storage_data=storage,
                  storage_meta=StorageMeta(checkpoint_id=str(it_dir), save_id=uuid.uuid4().hex), version="1.0.0")
    tmp = it_dir / (METADATA + ".tmp")
    with open(tmp, "wb") as f:
        pickle.dump(md, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, it_dir / METADATA)


# --- `ckptctl example --format torch_dist` ------------------------------------------------------

def example(family: str, layout: Layout, out: Path, opts: dict | None = None, seed: int = 1234,
            overwrite: bool = False, **kw) -> dict:
    """The legacy example of the same model and layout, converted to torch_dist in this process."""
    import inspect as pyinspect
    import shutil
    import uuid

    from ckptctl.convert import convert
    from ckptctl.example import example as legacy_example

    out = Path(out)
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise BadInput(f"destination {out} exists and is not empty (use --overwrite)")
    if "optimizer" in pyinspect.signature(legacy_example).parameters:
        kw["optimizer"] = kw.get("optimizer") or "none"      # distributed: written (torch_dist_optim)
    else:
        kw.pop("optimizer", None)
    optim_sharding = kw.pop("optim_sharding", None)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.legacy-{uuid.uuid4().hex[:8]}")
    try:
        res = legacy_example(family, layout, tmp, opts, seed=seed, **kw)
        rep = convert(tmp, out, layout, nproc=0, overwrite=overwrite, to_format=FORMAT, optim_sharding=optim_sharding)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    files = len(list((out / legacy.iter_dirname(rep_iteration(out))).glob("*.distcp")))
    return {**res, "out": str(out), "format": FORMAT, "files": files, "notes": rep.notes}


def rep_iteration(root: Path):
    found = _iter_dir(root)
    return found[0] if found else "release"
