"""torch_dist as a target, planned (pure): the chunks and objects megatron-core would save at a layout, each
chunk's bytes named as store-array regions."""
from __future__ import annotations

import argparse
from dataclasses import dataclass, field

import torch

from ckptctl.box import Box
from ckptctl.core.dtypes import itemsize as _itemsize, torch_dtype
from ckptctl.formats.megatron import args_dict, rewrite_args
from ckptctl.formats.torch_dist import traits
from ckptctl.formats.torch_dist.metadata import BACKEND
from ckptctl.formats.torch_dist.names import _EXPERT_ARRAY, dist_rest, is_local_spec
from ckptctl.layout import Layout
from ckptctl.models.base import Family
from ckptctl.models.config import ModelConfig
from ckptctl.models.rules import SEGMENTS, Piece
from ckptctl.reshard.plan import Namer, ObjectItem, _strip_expert, plan_target as legacy_target

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

    files = legacy_target(family, cfg, layout, manifest, arrays, slots)
    namer = Namer(family, cfg, layout)
    copies = family.tied_copies(cfg)
    stacks = family.stack_layers(cfg)
    seen: set[tuple] = set()
    chunks: list[DistChunk] = []
    objects: dict[str, tuple[str, str, str]] = {}
    order: dict[str, None] = {}
    experts = cfg.num_experts
    # MLA's local spec maps no norm names (its TransformerLayer spec has no sharded_state_dict_keys_map)
    local_names = is_local_spec(e["gkey"] for e in manifest) and not cfg.extra.get("multi_latent_attention")
    stacked = traits.stacked(family, cfg)
    for fp in files:
        for item in fp.items:
            loc = family.locate(item.gkey)
            ex = family.expert_of(loc.rest)
            rest = _strip_expert(family, loc).rest
            if loc.section == "layer":
                if stacked and loc.stack != "mtp":      # MTP layers are numbered keys (MultiTokenPredictionBlock)
                    fqn = f"{loc.stack}.layers.{dist_rest(rest, local_names)}"
                    pre_off, pre_shape = (loc.layer,), (stacks[loc.stack],)
                else:
                    fqn, pre_off, pre_shape = f"{loc.stack}.layers.{loc.layer}.{dist_rest(rest, local_names)}", (), ()
            else:
                fqn, pre_off, pre_shape = rest, (), ()
            if ex is not None:                              # the expert axis follows the layer axis
                pre_off, pre_shape = pre_off + (ex[1],), pre_shape + (experts,)
            if isinstance(item, ObjectItem):
                if item.gkey in traits.absent(family):
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
            if item.gkey in copies and not traits.saves_copies(family):
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
    out = dict(common)
    if "args" in out:
        a = rewrite_args(args_dict(out["args"]), layout, padded, num_layers)
        a["ckpt_format"] = BACKEND
        if local_names:
            a["transformer_impl"] = "local"
        out["args"] = argparse.Namespace(**a)
    out["content_metadata"] = dict(CONTENT_METADATA)
    return out

