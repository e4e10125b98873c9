"""The planner as it was before issue 16 (all-pairs overlap check, every file scanning every expert):
the reference the O(n log n) planner must reproduce exactly. Copied verbatim from commit f9b8329;
only the imports differ. Test-only code."""
# flake8: noqa
from __future__ import annotations

from ckptctl.box import Box
from ckptctl.errors import BadInput
from ckptctl.layout import Layout
from ckptctl.models.base import EXTRA_STATE, Family, KeyLoc
from ckptctl.models.config import ModelConfig
from ckptctl.models.rules import VOCAB, global_shapes, pieces
from ckptctl.reshard.plan import (MODEL, FilePlan, Inventory, Namer, ObjectItem, SourcePlan, TensorItem,
                                  _sort_key, _strip_expert, _with_copies, chunk_name)
from ckptctl.core.dtypes import chunk_shape, storage_dtype

# --- source ------------------------------------------------------------------------------------

def plan_source(family: Family, cfg: ModelConfig, layout: Layout, inventories: list[Inventory]) -> SourcePlan:
    namer = Namer(family, cfg, layout)
    copies = family.tied_copies(cfg)
    shapes: dict[str, tuple[tuple[int, ...], str, str]] = {}   # array -> (shape, dtype, first file)
    vocab: set[str] = set()
    raw: list[list[tuple]] = []
    order: dict[str, tuple] = {}
    manifest: dict[str, dict] = {}
    position = 0
    groups: dict = {}
    for inv in inventories:
        items = []
        for v, (chunk, entries) in enumerate(sorted(inv.chunks.items(), key=lambda kv: int(kv[0][5:] or 0))):
            where = f"{inv.dirname}/{chunk}"
            for key, shape, dtype in entries:
                gkey, loc, expert = namer.globalize(inv.coord, v, key, where)
                position += 1
                if loc.rest.endswith(EXTRA_STATE):
                    slot = namer.object_slot(gkey, loc, inv.coord)
                    items.append(("o", chunk, key, gkey, slot))
                    manifest.setdefault(gkey, {"gkey": gkey, "kind": "object"})
                    order.setdefault(gkey, _sort_key(loc, expert, position, family, groups))
                    continue
                if shape is None:
                    raise BadInput(f"{where}: key {key!r} is neither a tensor nor an _extra_state")
                rule = family.rule(_strip_expert(family, loc), cfg)
                copy_of = copies.get(gkey)
                aloc = family.locate(copy_of) if copy_of else loc
                base, g = namer.array_of(aloc)
                n, r = namer.split(rule, inv.coord)
                glob = global_shapes(rule, base, shape, n, cfg.num_experts if g is not None else None)
                if rule.kind == VOCAB:
                    vocab.add(base)
                for arr, gshape in glob.items():
                    prev = shapes.get(arr)
                    if prev is None:
                        shapes[arr] = (gshape, dtype, where)
                    elif prev[0] != gshape or prev[1] != dtype:
                        raise BadInput(
                            f"tensor {gkey!r}: shapes disagree across ranks: {where} implies {dtype} {gshape}, "
                            f"{prev[2]} implies {prev[1]} {prev[0]}")
                items.append(("t", chunk, key, gkey, dtype, tuple(shape), rule, base, g, n, r))
                if not copy_of:
                    manifest.setdefault(gkey, {"gkey": gkey, "kind": "tensor", "dtype": dtype})
                    order.setdefault(gkey, _sort_key(loc, expert, position, family, groups))
        raw.append(items)

    arr_shapes = {a: s for a, (s, _, _) in shapes.items()}
    files: list[FilePlan] = []
    owners: dict[str, dict[Box, int]] = {a: {} for a in shapes}
    slots: dict[str, int] = {}
    for i, (inv, items) in enumerate(zip(inventories, raw)):
        fp = FilePlan(inv.coord, inv.dirname, tuple(sorted(inv.chunks, key=lambda c: int(c[5:] or 0))))
        for it in items:
            if it[0] == "o":
                _, chunk, key, gkey, slot = it
                slots.setdefault(slot, i)
                fp.items.append(ObjectItem(chunk, key, gkey, slot))
                continue
            _, chunk, key, gkey, dtype, shape, rule, base, g, n, r = it
            lshape, ps = pieces(rule, base, arr_shapes, n, r, expert=g)
            if tuple(lshape) != shape:
                raise BadInput(f"{inv.dirname}/{chunk}: tensor {key!r} has shape {shape}, expected {tuple(lshape)}")
            owned = []
            for p in ps:
                boxes = owners[p.array]
                if p.gbox in boxes:
                    owned.append(False)
                    continue
                for b in boxes:
                    if b.intersect(p.gbox) is not None:
                        raise BadInput(f"tensor {gkey!r} in {inv.dirname}: its shard overlaps another rank's "
                                       f"shard without matching it")
                boxes[p.gbox] = i
                owned.append(True)
            fp.items.append(TensorItem(chunk, key, gkey, dtype, shape, tuple(ps), tuple(owned)))
        files.append(fp)

    arrays = {}
    for a, (shape, dtype, _) in shapes.items():
        vol = 1
        for s in shape:
            vol *= s
        got = sum(b.volume for b in owners[a])
        if got != vol:
            raise BadInput(f"tensor {a.removeprefix(MODEL)!r}: the source files cover {got} of its {vol} elements")
        import numpy as np
        arrays[a] = {"shape": list(shape), "dtype": dtype, "vocab": a in vocab,
                     "chunks": list(chunk_shape(shape, list(owners[a]), np.dtype(storage_dtype(dtype)).itemsize))}
    ordered = [manifest[k] for k in sorted(manifest, key=lambda k: order[k])]
    return SourcePlan(arrays=arrays, files=files, manifest=ordered, slots=slots)


# --- target ------------------------------------------------------------------------------------

def plan_target(family: Family, cfg: ModelConfig, layout: Layout, manifest: list[dict],
                arrays: dict[str, dict], slots: set[str]) -> list[FilePlan]:
    """The files of `layout`, each tensor's local shape and the store regions that fill it."""
    family.validate(cfg, layout)
    namer = Namer(family, cfg, layout)
    shapes = {a: tuple(s["shape"]) for a, s in arrays.items()}
    vocab_rows = cfg.vocab_for_tp(layout.tp) if cfg.true_vocab is not None else None
    entries = _with_copies(family, cfg, layout, manifest)
    placed: dict[tuple[int, int], list[tuple[dict, KeyLoc, int, int | None]]] = {}
    for e in entries:
        loc = family.locate(e["gkey"])
        p, v, l = namer.placement(loc)
        ex = family.expert_of(loc.rest)
        for pv in [(p, v)] + family.also_on(loc, cfg, layout):     # + copies under the same key (MTP stage)
            placed.setdefault(pv, []).append((e, loc, l, ex))
    files = []
    for fc in layout.model_files:
        chunks = tuple(chunk_name(layout, v) for v in range(layout.vpp))
        fp = FilePlan(fc, fc.dirname(layout), chunks)
        for v, chunk in enumerate(chunks):
            for e, loc, l, ex in placed.get((fc.pp, v), []):
                rest = loc.rest
                g = None
                if ex is not None:
                    pattern, g = ex
                    if g // namer.experts_per_rank != fc.ep:
                        continue
                    rest = pattern.format(e=g % namer.experts_per_rank)
                key = KeyLoc(loc.section, loc.stack, l, rest).key()
                if e["kind"] == "object":
                    fp.items.append(ObjectItem(chunk, key, e["gkey"], namer.object_slot(e["gkey"], loc, fc)))
                    continue
                src = family.locate(e.get("copy_of") or e["gkey"])
                rule = family.rule(_strip_expert(family, src), cfg)
                base, _ = namer.array_of(src)
                n, r = namer.split(rule, fc)
                if rule.kind == VOCAB and vocab_rows is None and shapes[base][0] % n:
                    raise BadInput(f"tensor {e['gkey']!r}: padded vocab {shapes[base][0]} does not split over TP={n}; "
                                   "pass --true-vocab-size")
                lshape, ps = pieces(rule, base, shapes, n, r, expert=g,
                                    split_size=vocab_rows if rule.kind == VOCAB else None)
                fp.items.append(TensorItem(chunk, key, e["gkey"], e["dtype"], tuple(lshape), tuple(ps)))
        files.append(fp)
    return files
