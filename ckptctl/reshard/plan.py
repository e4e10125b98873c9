"""The pure planner: source rank files -> global store regions -> target rank files.

No I/O, no torch.distributed: from (family, config, layouts, key inventories) it computes, for every
local tensor of every rank file, the `Piece`s that map it onto global arrays, which file writes each
store region (exactly one), the store's arrays and chunk grids, and the target files' contents.
Every input error surfaces here, before any byte is written.
"""
from __future__ import annotations

import gc
from contextlib import contextmanager
from dataclasses import dataclass, field

from ckptctl.box import Box, find_overlap
from ckptctl.errors import BadInput
from ckptctl.layout import FileCoord, Layout
from ckptctl.models.base import EXTRA_STATE, Family, KeyLoc
from ckptctl.models.config import ModelConfig
from ckptctl.models.rules import VOCAB, Piece, Rule, global_shapes, pieces
from ckptctl.core.coverage import coverage_problems
from ckptctl.core.dtypes import chunk_shape, itemsize

MODEL = "model/"
OBJECTS = "objects/"


@dataclass(frozen=True)
class TensorItem:
    chunk: str                      # "model" or "model<v>"
    key: str                        # local key in that chunk's state dict
    gkey: str                       # global key (global layer and expert numbers)
    dtype: str                      # torch dtype name
    shape: tuple[int, ...]          # local shape
    pieces: tuple[Piece, ...]
    owned: tuple[bool, ...] = ()    # source side: which pieces this file writes to the store

    @property
    def covered(self) -> int:
        return sum(p.local.volume for p in self.pieces)


@dataclass(frozen=True)
class ObjectItem:
    chunk: str
    key: str
    gkey: str
    slot: str                       # identifies the stored object: "<gkey>|<n>|<r>"


@dataclass
class FilePlan:
    coord: FileCoord
    dirname: str
    chunks: tuple[str, ...]
    items: list = field(default_factory=list)        # TensorItem | ObjectItem, in state-dict order
    _tensors: tuple = field(default=(None, -1, ()), compare=False, repr=False)

    @property
    def tensors(self) -> list[TensorItem]:
        # kept while `items` is the same list of the same length (items are only ever appended): callers index
        # `fp.tensors[i]` once per parameter, which rebuilt the list each time (250k times at 8,192 files)
        items, n, ts = self._tensors
        if items is not self.items or n != len(self.items):
            ts = [i for i in self.items if isinstance(i, TensorItem)]
            self._tensors = (self.items, len(self.items), ts)
        return ts

    @property
    def objects(self) -> list[ObjectItem]:
        return [i for i in self.items if isinstance(i, ObjectItem)]

    def nbytes(self) -> int:
        return sum(_nbytes(t, p) for t in self.tensors for p in t.pieces)


@dataclass
class SourcePlan:
    arrays: dict[str, dict]         # store array name -> {"shape", "dtype", "chunks"}
    files: list[FilePlan]
    manifest: list[dict]            # global entries in state-dict order: {"gkey", "kind", "dtype"}
    slots: dict[str, int]           # object slot -> index of the file that stores it

    def owned_bytes(self, i: int) -> int:
        return sum(_nbytes(t, p) for t in self.files[i].tensors for p, o in zip(t.pieces, t.owned) if o)


def _nbytes(t: TensorItem, p: Piece) -> int:
    return p.local.volume * itemsize(t.dtype)


@dataclass(frozen=True)
class Inventory:
    """What one source rank file holds: per chunk, (key, shape, dtype); shape None for objects."""

    coord: FileCoord
    dirname: str
    chunks: dict[str, list[tuple[str, tuple[int, ...] | None, str | None]]]

    def to_json(self) -> dict:
        return {"coord": self.coord.to_json(), "dirname": self.dirname,
                "chunks": {c: [[k, None if s is None else list(s), d] for k, s, d in e] for c, e in self.chunks.items()}}

    @classmethod
    def from_json(cls, d: dict) -> "Inventory":
        """The one way an inventory is rebuilt from JSON (inspect's report, a job file); other keys are ignored."""
        return cls(FileCoord(**d["coord"]), d["dirname"],
                   {c: [(k, tuple(s) if s is not None else None, dt) for k, s, dt in e] for c, e in d["chunks"].items()})


def chunk_name(layout: Layout, v: int) -> str:
    return f"model{v}" if layout.vpp > 1 else "model"


# --- naming ------------------------------------------------------------------------------------

class Namer:
    """Local key <-> global key <-> store array, for one family, config and layout."""

    def __init__(self, family: Family, cfg: ModelConfig, layout: Layout):
        self.family, self.cfg, self.layout = family, cfg, layout
        self.ranges = family.layer_ranges(cfg, layout)
        self.experts_per_rank = cfg.num_experts // layout.ep if cfg.num_experts else 0

    def globalize(self, fc: FileCoord, v: int, key: str, where: str) -> tuple[str, KeyLoc, int | None]:
        """(global key, its location, global expert or None) of a local key."""
        loc = self.family.locate(key)
        if loc.section == "layer":
            if loc.stack not in self.ranges:
                raise BadInput(f"{where}: key {key!r}: unknown layer stack {loc.stack!r}")
            rng = self.ranges[loc.stack][fc.pp][v]
            if loc.layer >= len(rng):
                raise BadInput(f"{where}: key {key!r}: layer {loc.layer} beyond the {len(rng)} layers this "
                               f"stage holds in layout {self.layout}")
            loc = KeyLoc("layer", loc.stack, rng.start + loc.layer, loc.rest)
        expert = None
        ex = self.family.expert_of(loc.rest)
        if ex is not None:
            pattern, j = ex
            if not self.experts_per_rank or j >= self.experts_per_rank:
                raise BadInput(f"{where}: key {key!r}: local expert {j} but {self.cfg.num_experts} experts over EP={self.layout.ep}")
            expert = fc.ep * self.experts_per_rank + j
            loc = KeyLoc(loc.section, loc.stack, loc.layer, pattern.format(e=expert))
        return loc.key(), loc, expert

    def array_of(self, loc: KeyLoc) -> tuple[str, int | None]:
        """Store array base name and expert index of a global key location."""
        ex = self.family.expert_of(loc.rest)
        if ex is None:
            return MODEL + loc.key(), None
        pattern, g = ex
        rest = self.family.expert_array(pattern)
        return MODEL + KeyLoc(loc.section, loc.stack, loc.layer, rest).key(), g

    def placement(self, loc: KeyLoc) -> tuple[int, int, int]:
        """(pp stage, vpp chunk, local layer) that holds a global key in this layout."""
        last = (self.layout.pp - 1, self.layout.vpp - 1)
        if loc.section == "pre":
            return 0, 0, -1
        if loc.section == "post":
            return last[0], last[1], -1
        for p, chunks in enumerate(self.ranges[loc.stack]):
            for v, rng in enumerate(chunks):
                if loc.layer in rng:
                    return p, v, loc.layer - rng.start
        raise BadInput(f"layer {loc.layer} of {loc.stack} does not exist in layout {self.layout}")

    def split(self, rule: Rule, fc: FileCoord) -> tuple[int, int]:
        n = rule.n(self.layout.tp, self.layout.expert_tp)
        if n == 1:
            return 1, 0
        return n, (fc.etp if rule.group == "etp" else fc.tp)

    def object_slot(self, gkey: str, loc: KeyLoc, fc: FileCoord) -> str:
        # An _extra_state belongs to its module's shard: carry it only to the same (n, r) shard.
        custom = self.family.object_shard(loc, self.layout, fc)
        if custom is not None:
            return f"{gkey}|{custom}"
        group_etp = ".experts." in gkey
        n = self.layout.expert_tp if group_etp else self.layout.tp
        r = fc.etp if group_etp else fc.tp
        return f"{gkey}|{n}|{r}"


# --- source ------------------------------------------------------------------------------------

FREEZE_AFTER = 1_000_000     # objects made while paused above which they are frozen, not scanned


@contextmanager
def _gc_paused():
    """Plans are millions of small acyclic objects: each full collection of the cyclic GC would walk all
    of them again (half the planning time at 1,024 files). Reference counting still frees everything.

    Re-enabling the GC after a large plan would scan every object made meanwhile once more (the young
    generation holds them all: 1-2 s of an 8,192-file plan); those are moved to the permanent generation
    instead (`gc.freeze`, meant for long-lived objects), where they are still freed by reference counting."""
    was = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was:
            if gc.get_count()[0] > FREEZE_AFTER:
                gc.freeze()
            gc.enable()


def plan_source(family: Family, cfg: ModelConfig, layout: Layout, inventories: list[Inventory]) -> SourcePlan:
    with _gc_paused():
        return _plan_source(family, cfg, layout, inventories)


def _plan_source(family: Family, cfg: ModelConfig, layout: Layout, inventories: list[Inventory]) -> SourcePlan:
    namer = Namer(family, cfg, layout)
    copies = family.tied_copies(cfg)
    shapes: dict[str, tuple[tuple[int, ...], str, str]] = {}   # array -> (shape, dtype, first file)
    vocab: set[str] = set()
    raw: list[list[tuple]] = []
    order: dict[str, tuple] = {}
    manifest: dict[str, dict] = {}
    position = 0
    groups: dict = {}
    # Files of one (pp, ep) hold the same keys (TP ranks, and every EP rank's dense part): a key's global
    # name, rule and array are worked out once, not once per file.
    located: dict[tuple, tuple] = {}        # (pp, ep, chunk index, local key) -> globalize()
    tensor_of: dict[str, tuple] = {}        # gkey -> (rule, copy_of, array base, expert)
    implied: dict[tuple, dict] = {}         # global_shapes() per (rule, base, local shape, n, expert axis)
    for inv in inventories:
        items = []
        for v, (chunk, entries) in enumerate(sorted(inv.chunks.items(), key=lambda kv: int(kv[0][5:] or 0))):
            where = f"{inv.dirname}/{chunk}"
            for key, shape, dtype in entries:
                lk = (inv.coord.pp, inv.coord.ep, v, key)
                hit = located.get(lk)
                if hit is None:
                    hit = located[lk] = namer.globalize(inv.coord, v, key, where)
                gkey, loc, expert = hit
                position += 1
                if loc.rest.endswith(EXTRA_STATE):
                    slot = namer.object_slot(gkey, loc, inv.coord)
                    items.append(("o", chunk, key, gkey, slot))
                    if gkey not in manifest:
                        manifest[gkey] = {"gkey": gkey, "kind": "object"}
                        order[gkey] = _sort_key(loc, expert, position, family, groups)
                    continue
                if shape is None:
                    raise BadInput(f"{where}: key {key!r} is neither a tensor nor an _extra_state")
                info = tensor_of.get(gkey)
                if info is None:
                    rule = family.rule(_strip_expert(family, loc), cfg)
                    copy_of = copies.get(gkey)
                    aloc = family.locate(copy_of) if copy_of else loc
                    info = tensor_of[gkey] = (rule, copy_of, *namer.array_of(aloc))
                rule, copy_of, base, g = info
                n, r = namer.split(rule, inv.coord)
                shape = tuple(shape)
                gk = (rule, base, shape, n, g is not None)
                glob = implied.get(gk)
                if glob is None:
                    glob = implied[gk] = global_shapes(rule, base, shape, n, cfg.num_experts if g is not None else None)
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
                items.append(("t", chunk, key, gkey, dtype, shape, rule, base, g, n, r))
                if not copy_of and gkey not in manifest:
                    manifest[gkey] = {"gkey": gkey, "kind": "tensor", "dtype": dtype}
                    order[gkey] = _sort_key(loc, expert, position, family, groups)
        raw.append(items)

    arr_shapes = {a: s for a, (s, _, _) in shapes.items()}
    cut = _pieces_cache(arr_shapes)
    files: list[FilePlan] = []
    owners: dict[str, dict[Box, tuple[int, str]]] = {a: {} for a in shapes}   # box -> (file, gkey) of its writer
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
            lshape, ps = cut(rule, base, n, r, g)
            if tuple(lshape) != shape:
                raise BadInput(f"{inv.dirname}/{chunk}: tensor {key!r} has shape {shape}, expected {tuple(lshape)}")
            owned = []
            for p in ps:
                # An identical box is a replica (owned by its first holder); any other overlap is
                # found below, per array, by one sweep instead of comparing every pair of shards.
                boxes = owners[p.array]
                if p.gbox in boxes:
                    owned.append(False)
                    continue
                boxes[p.gbox] = (i, gkey)
                owned.append(True)
            fp.items.append(TensorItem(chunk, key, gkey, dtype, shape, tuple(ps), tuple(owned)))
        files.append(fp)

    for a, held in owners.items():
        boxes = list(held)
        hit = find_overlap(boxes)
        if hit is not None:
            (fi, ki), (fj, kj) = held[boxes[hit[0]]], held[boxes[hit[1]]]
            raise BadInput(f"tensor {kj!r} in {files[fj].dirname}: its shard overlaps another rank's shard "
                           f"without matching it ({ki!r} in {files[fi].dirname})")
    arrays = {}
    for a, (shape, dtype, _) in shapes.items():
        bad = coverage_problems(tuple(shape), list(owners[a]), disjoint=True)   # overlaps checked above
        if bad:
            raise BadInput(f"tensor {a.removeprefix(MODEL)!r}: the source files {bad[0]}")
        arrays[a] = {"shape": list(shape), "dtype": dtype, "vocab": a in vocab,
                     "chunks": list(chunk_shape(shape, list(owners[a]), itemsize(dtype)))}   # no numpy: inspect
    ordered = [manifest[k] for k in sorted(manifest, key=lambda k: order[k])]
    return SourcePlan(arrays=arrays, files=files, manifest=ordered, slots=slots)


def _pieces_cache(shapes: dict):
    """`pieces` memoized for one plan (the array shapes are fixed): replicas of a tensor (TP ranks holding
    the same experts, replicated norms on every rank) are cut once."""
    cache: dict = {}

    def cut(rule: Rule, base: str, n: int, r: int, expert: int | None = None, split_size: int | None = None):
        key = (rule, base, n, r, expert, split_size)
        hit = cache.get(key)
        if hit is None:
            if expert is None:
                lshape, ps = pieces(rule, base, shapes, n, r, split_size=split_size)
                hit = cache[key] = (tuple(lshape), tuple(ps))
            else:
                # expert e's pieces are expert 0's with e on the leading axis: cut once per rank, not per expert
                proto = cut(rule, base, n, r, 0, split_size) if expert else None
                if proto is None:
                    lshape, ps = pieces(rule, base, shapes, n, r, expert=0, split_size=split_size)
                    hit = cache[key] = (tuple(lshape), tuple(ps))
                else:
                    hit = cache[key] = (proto[0], tuple(
                        Piece(p.local, p.array, Box((expert,) + p.gbox.offsets[1:], p.gbox.sizes)) for p in proto[1]))
        return hit
    return cut


def _strip_expert(family: Family, loc: KeyLoc) -> KeyLoc:
    """Rules are looked up on the expert-free name (`...experts.linear_fc1.weight`)."""
    ex = family.expert_of(loc.rest)
    if ex is None:
        return loc
    return KeyLoc(loc.section, loc.stack, loc.layer, family.expert_array(ex[0]))


def _sort_key(loc: KeyLoc, expert: int | None, position: int, family: Family, groups: dict) -> tuple:
    """State-dict order: sections, stacks, layers; within a layer first-seen order, experts by index.

    `position` is where the key was first seen (files are read in stage order); for experts the
    position of the group (all keys of expert e before expert e+1, as Megatron's modules emit them)."""
    sec = family.section_rank(loc)
    stack = family.stacks.index(loc.stack) if loc.stack in family.stacks else 0
    if expert is None:
        return (sec, stack, loc.layer, position, -1, 0)
    pattern, _ = family.expert_of(loc.rest)
    group = pattern.split("{e}")[0]
    return (sec, stack, loc.layer, groups.setdefault((loc.stack, loc.layer, group), position), expert, position)


# --- target ------------------------------------------------------------------------------------

def plan_target(family: Family, cfg: ModelConfig, layout: Layout, manifest: list[dict],
                arrays: dict[str, dict], slots: set[str]) -> list[FilePlan]:
    """The files of `layout`, each tensor's local shape and the store regions that fill it."""
    with _gc_paused():
        return _plan_target(family, cfg, layout, manifest, arrays, slots)


def _plan_target(family: Family, cfg: ModelConfig, layout: Layout, manifest: list[dict],
                 arrays: dict[str, dict], slots: set[str]) -> list[FilePlan]:
    family.validate(cfg, layout)
    namer = Namer(family, cfg, layout)
    shapes = {a: tuple(s["shape"]) for a, s in arrays.items()}
    vocab_rows = cfg.vocab_for_tp(layout.tp) if cfg.true_vocab is not None else None
    entries = _with_copies(family, cfg, layout, manifest)
    cut = _pieces_cache(shapes)
    # Per (stage, chunk, EP rank) the entries its files hold, in manifest order: the dense ones and the
    # experts of that EP rank (one pass over the manifest; a file never scans other ranks' experts).
    # Local key, rule and array depend on the layout only, so they are worked out once per entry.
    placed: dict[tuple[int, int, int], list[tuple]] = {}
    for e in entries:
        loc = family.locate(e["gkey"])
        p, v, l = namer.placement(loc)
        ex = family.expert_of(loc.rest)
        rest, g = loc.rest, None
        if ex is not None:
            pattern, g = ex
            rest = pattern.format(e=g % namer.experts_per_rank)
        key = KeyLoc(loc.section, loc.stack, l, rest).key()
        rule = base = None
        if e["kind"] != "object":
            src = family.locate(e.get("copy_of") or e["gkey"])
            rule = family.rule(_strip_expert(family, src), cfg)
            base, _ = namer.array_of(src)
        ranks = range(layout.ep) if ex is None else [g // namer.experts_per_rank]
        for pv in [(p, v)] + family.also_on(loc, cfg, layout):     # + copies under the same key (MTP stage)
            for ep in ranks:
                placed.setdefault((*pv, ep), []).append((e, loc, key, g, rule, base))
    files = []
    for fc in layout.model_files:
        chunks = tuple(chunk_name(layout, v) for v in range(layout.vpp))
        fp = FilePlan(fc, fc.dirname(layout), chunks)
        for v, chunk in enumerate(chunks):
            for e, loc, key, g, rule, base in placed.get((fc.pp, v, fc.ep), []):
                if rule is None:
                    fp.items.append(ObjectItem(chunk, key, e["gkey"], namer.object_slot(e["gkey"], loc, fc)))
                    continue
                n, r = namer.split(rule, fc)
                if rule.kind == VOCAB and vocab_rows is None and shapes[base][0] % n:
                    raise BadInput(f"tensor {e['gkey']!r}: padded vocab {shapes[base][0]} does not split over TP={n}; "
                                   "pass --true-vocab-size")
                lshape, ps = cut(rule, base, n, r, g, vocab_rows if rule.kind == VOCAB else None)
                fp.items.append(TensorItem(chunk, key, e["gkey"], e["dtype"], lshape, ps))
        files.append(fp)
    return files


def _with_copies(family: Family, cfg: ModelConfig, layout: Layout, manifest: list[dict]) -> list[dict]:
    """Insert tied copies (output layer on the last stage) where the target layout has them."""
    out = list(manifest)
    for copy_key, src in family.tied_copies(cfg).items():
        if not family.emits_copy(copy_key, cfg, layout):
            continue
        srce = next((e for e in manifest if e["gkey"] == src), None)
        if srce is None:
            continue
        entry = {"gkey": copy_key, "kind": "tensor", "dtype": srce["dtype"], "copy_of": src}
        module = copy_key.rsplit(".", 1)[0] + "."
        idx = next((i for i, e in enumerate(out) if e["gkey"].startswith(module)), None)
        if idx is None:  # after the top-level module of what it copies (T5: `position_embeddings` after `embedding.*`)
            top, idx = src.split(".", 1)[0] + ".", out.index(srce) + 1
            while idx < len(out) and out[idx]["gkey"].startswith(top):
                idx += 1
        out.insert(idx, entry)
    return out
