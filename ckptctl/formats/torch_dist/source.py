"""torch_dist as a source: the pure source plan (DCP chunks onto the store's per-layer arrays) and the units
a source worker reads (blobs, never whole files)."""
from __future__ import annotations

import json
from pathlib import Path

from ckptctl.box import Box
from ckptctl.core.coverage import coverage_problems
from ckptctl.core.dtypes import chunk_shape, itemsize as _itemsize, storage_dtype
from ckptctl.errors import BadInput
from ckptctl.formats.megatron import TOP_LEVEL_POLICY
from ckptctl.formats.torch_dist import traits
from ckptctl.formats.torch_dist.metadata import COMMON_KEY, COMMON_PT, BACKEND, RNG_KEY, load_object, load_tensor
from ckptctl.formats.torch_dist.names import (DROPPED_PREFIXES, expert_keys, parse_shard, rng_slot, segment_of,
                                                split_fqn, store_key)
from ckptctl.layout import FileCoord, Layout
from ckptctl.models.base import EXTRA_STATE, Family
from ckptctl.models.config import ModelConfig
from ckptctl.models.rules import VOCAB, Piece
from ckptctl.optstate.order import ModelOrder, sort_position
from ckptctl.reshard.plan import MODEL, FilePlan, Namer, ObjectItem, SourcePlan, TensorItem, _sort_key, _strip_expert
from ckptctl.storage.pickles import load_pt

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
                boxes[names[lay]].append(gbox)
                piece = Piece(Box.full(lsizes), names[lay], gbox)
                key = json.dumps([off, None if lay is None else lay - off[0]])
                items.append(TensorItem(fqn, key, store_key(fqn, lay, spec), dtype, tuple(lsizes), (piece,), (True,)))
            units.append(FilePlan(FileCoord(0, 0), f"{fname}@{boff}", (fqn,), items))

    for a, spec_ in arrays.items():
        bad = coverage_problems(tuple(spec_["shape"]), boxes[a])
        if bad:
            raise BadInput(f"tensor {a.removeprefix(MODEL)!r}: the torch_dist chunks {bad[0]}")
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
        slot = f"{gkey}|{BACKEND}|0"
        units[0].items.append(ObjectItem(name, name, gkey, slot))
        slots[slot] = 0
        note(gkey, loc, "object", position[key])
    # Objects the legacy format has and torch_dist leaves out (values: the encoding's empty value).
    for key in traits.absent(family):
        if key not in manifest and key in _fresh_objects(family, cfg):
            note(key, family.locate(key), "object", len(order))
    ordered = [manifest[k] for k in sorted(manifest, key=lambda k: sort[k])]
    return SourcePlan(arrays=arrays, files=units, manifest=ordered, slots=slots)


def _fresh_objects(family: Family, cfg: ModelConfig) -> set[str]:
    try:
        return {k for k, s in family.global_keys(cfg) if s is None}
    except NotImplementedError:
        return set()


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
                from ckptctl.formats.torch_dist.offsets import BlobLocator
                self._locator = (x.untyped_storage().data_ptr(), BlobLocator(self.iter_dir / c[2], c[3], c[4]))
                if tuple(x.shape) != tuple(c[1]) or str(x.dtype).removeprefix("torch.") != t.dtype:
                    raise BadInput(f"{self.iter_dir / c[2]}: chunk {off} of {t.chunk!r} holds {x.dtype} "
                                   f"{tuple(x.shape)}, the metadata says {t.dtype} {tuple(c[1])}")
                return x
        raise BadInput(f"{self.iter_dir}: no chunk {off} of {t.chunk!r}")

    def locate(self, tensor: torch.Tensor) -> tuple[str, int] | None:
        """(file, offset of the tensor's storage's first byte) for a tensor of the blob read last."""
        ptr, loc = getattr(self, "_locator", (None, None))
        return loc(tensor) if loc is not None and tensor.untyped_storage().data_ptr() == ptr else None

    def object(self, o: ObjectItem):
        return load_object(self.iter_dir, self.index["objects"][o.chunk], o.chunk)

    def rng(self) -> dict:
        if self.fp.dirname != OBJECTS_UNIT:
            return {}
        return {rng_slot(n, self.layout): load_object(self.iter_dir, r, n)
                for n, r in self.index["objects"].items() if n.startswith(RNG_KEY + "/")}

    def common(self) -> dict:
        ref = self.index["objects"].get(f"{COMMON_KEY}/shard_0_1")
        common = load_object(self.iter_dir, ref, COMMON_KEY) if ref else load_pt(self.iter_dir / COMMON_PT, mmap=False)
        return common_for_store(common)

    def dropped(self) -> list[str]:
        return dropped_keys(self.index)


def common_for_store(common: dict) -> dict:
    """The common state's entries the store keeps (same policies as legacy top-level keys)."""
    out = {}
    for k, v in common.items():
        pol = TOP_LEVEL_POLICY.get(k)
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

