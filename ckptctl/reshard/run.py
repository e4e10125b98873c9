"""The worker: executes the plan. Source phase (rank files -> store), target phase (store -> rank files).

Every worker computes the same plan from the job (the planner is pure and deterministic), takes its
share of the files, and touches only the store regions the plan gives it.
"""
from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ckptctl.box import Box
from ckptctl.errors import BadInput
from ckptctl import formats, optim
from ckptctl.formats import legacy
from ckptctl.layout import FileCoord, Layout
from ckptctl.models import get_family
from ckptctl.models.config import ModelConfig
from ckptctl.reshard.comm import Comm, assign
from ckptctl.reshard import stream
from ckptctl.reshard.plan import OBJECTS, FilePlan, Inventory, ObjectItem, TensorItem, plan_target
from ckptctl.store import FORMAT, FORMAT_VERSION, Crc32cCodec, Store, configure, torch_dtype

COMMON = "common"
OPTIM_COMMON = "optimizer@common"


@dataclass
class Job:
    """Everything a worker needs; written by the CLI as JSON, read by every worker."""

    workdir: str
    store: str
    family: str = "gpt"
    cfg: dict | None = None
    src: str | None = None                     # legacy checkpoint root (source phase)
    src_layout: dict | None = None
    inventories: list = field(default_factory=list)   # [{"coord", "dirname", "path", "chunks"}]
    out: str | None = None                     # output root (target phase)
    dst_layout: dict | None = None
    rng: str = "auto"
    iteration: int | str = "release"
    phases: tuple = ("source", "target")
    src_format: str = "legacy"                 # ckptctl.formats: "legacy" | "torch_dist"
    dist: dict | None = None                   # torch_dist source: {"iter_dir", "spec", "index"}
    dst_format: str = "legacy"
    optim: dict | None = None                  # ckptctl.optim: the source's optimizer variant (None: not converted)
    max_memory: int | None = None              # per-worker RSS budget in bytes (ckptctl.reshard.stream)
    optim_sharding: str | None = None          # torch_dist target: distributed-optimizer sharding type

    def save(self, path: Path) -> None:
        Path(path).write_text(json.dumps(self.__dict__))

    @classmethod
    def load(cls, path: Path) -> "Job":
        return cls(**json.loads(Path(path).read_text()))


class Progress:
    """Bytes done by this worker, in a file the launcher sums (cheap, no communication)."""

    def __init__(self, workdir: str | None, rank: int):
        self.path = Path(workdir) / "progress" / f"rank{rank}" if workdir else None
        self.done, self._last = 0, 0.0
        if self.path:
            self.path.parent.mkdir(parents=True, exist_ok=True)

    def add(self, n: int, force: bool = False) -> None:
        self.done += n
        now = time.monotonic()
        if self.path and (force or now - self._last > 0.2):
            self._last = now
            tmp = self.path.with_suffix(".tmp")
            tmp.write_text(str(self.done))
            os.replace(tmp, self.path)


def inventories_of(job: Job) -> list[Inventory]:
    return [Inventory(FileCoord(**i["coord"]), i["dirname"],
                      {c: [(k, tuple(s) if s is not None else None, d) for k, s, d in e] for c, e in i["chunks"].items()})
            for i in job.inventories]


# --- objects in the store (extra state, args, RNG): torch.save bytes as 1-D uint8 arrays -----------

def _object_name(slot: str) -> str:
    return OBJECTS + slot.replace("|", "@").replace("/", "_")


def put_object(store: Store, slot: str, value) -> str:
    if value is None:
        return "none"
    data = np.frombuffer(legacy.dumps_bytes(value), dtype=np.uint8)
    store.group.create_array(_object_name(slot), shape=data.shape, dtype="uint8", chunks=data.shape or (1,),
                             compressors=Crc32cCodec(), filters=None, fill_value=0, overwrite=True)[...] = data
    return "bytes"


def get_object(store: Store, slot: str, enc: str):
    if enc == "none":
        return None
    return legacy.loads_bytes(store.group[_object_name(slot)][...].tobytes(), slot)


def empty_like_encoding(value):
    """The empty value of an _extra_state's encoding: written when a module's shard changed."""
    if value is None:
        return None
    if torch.is_tensor(value):
        return torch.empty(0, dtype=value.dtype)
    import io
    return io.BytesIO()


# --- source phase --------------------------------------------------------------------------------

def source_phase(job: Job, comm: Comm, progress: Progress) -> dict:
    family = get_family(job.family)
    cfg = ModelConfig.from_json(job.cfg)
    layout = Layout.from_json(job.src_layout)
    plan = formats.source_plan(job.src_format, family, cfg, layout, job.inventories, job.dist)
    open_unit = formats.unit_opener(job.src_format, layout, job.inventories, job.dist)
    oside = formats.optim_source(job.src_format, family, cfg, layout, job.optim, plan, job.dist) if job.optim else None
    own_units = getattr(oside, "run", None)       # torch_dist: decodes per model-parallel rank, not per unit
    from ckptctl.reshard import resume
    keep = resume.keep_store(job)   # --resume: an interrupted run's store and finished files are kept
    if comm.rank == 0 and not keep:
        Store.create(Path(job.store), {}, {"format": FORMAT, "complete": False})
    comm.barrier()
    store = Store.open(Path(job.store), mode="r+")
    arrays = {**plan.arrays, **(oside.arrays() if oside else {})}
    store.add_arrays({a: arrays[a] for a in sorted(arrays)[comm.rank::comm.world]},   # creating costs ms each
                     existing_ok=keep)
    comm.barrier()
    mine = assign([plan.owned_bytes(i) + 1 for i in range(len(plan.files))], comm.world)[comm.rank]
    budget = stream.Budget(job.max_memory)
    encodings: dict[str, str] = {}
    for i in mine:
        fp = plan.files[i]
        done = resume.source_done(job, i) if keep else None
        if done is not None:
            encodings.update(done)
            progress.add(plan.owned_bytes(i))
            continue
        before = dict(encodings)
        sd = open_unit(fp)
        for t in fp.tensors:
            if not any(t.owned):
                continue
            tensor = sd.tensor(t)
            if tuple(tensor.shape) != t.shape or str(tensor.dtype).removeprefix("torch.") != t.dtype:
                raise BadInput(f"{fp.dirname}: tensor {t.key!r} changed since inspection")
            mapped = isinstance(sd, legacy.LegacyUnit)   # memory-mapped rank file: pages can be dropped
            for p, owned in zip(t.pieces, t.owned):
                if owned:
                    put_piece(store, p, tensor[p.local.slices], budget.block, progress, mapped)
        for o in fp.objects:
            if plan.slots[o.slot] == i:
                encodings[o.slot] = put_object(store, o.slot, sd.object(o))
        for slot, value in sd.rng().items():
            encodings[slot] = put_object(store, slot, value)
        if oside is not None and own_units is None:
            st = oside.write_file(store, i, fp, sd.sd, Path(job.inventories[i]["path"]), progress)
            if i == 0:
                encodings[OPTIM_COMMON] = put_object(store, OPTIM_COMMON, st.common)
        if i == 0:
            encodings[COMMON] = put_object(store, COMMON, sd.common())
            encodings["__dropped__"] = ",".join(k for k in sd.dropped() if not (oside and k == "optimizer"))
        del sd
        resume.mark_source(job, i, {k: v for k, v in encodings.items() if k not in before or before[k] != v})
    if own_units is not None:
        encodings.update(own_units(store, comm, progress))
    progress.add(0, force=True)
    gathered = comm.all_gather_object(encodings)   # also: every worker's pieces are in the store now
    from ckptctl.reshard import replicas
    replicas.check(store, plan, mine, open_unit, comm)   # replicated tensors byte-equal to the stored copy
    if comm.rank == 0:
        encs = {}
        for g in gathered:
            encs.update(g)
        dropped = encs.pop("__dropped__", "")
        store.set_attrs({
            "format": FORMAT, "format_version": FORMAT_VERSION, "complete": True,
            "family": job.family, "config": job.cfg, "source_layout": job.src_layout, "source_format": job.src_format,
            "manifest": plan.manifest, "arrays": {a: {k: s[k] for k in ("shape", "dtype", "vocab")} for a, s in plan.arrays.items()},
            "objects": encs, "source_files": [fp.dirname for fp in plan.files],
            "vocab": {"true": cfg.true_vocab, "padded": cfg.padded_vocab, "divisor": cfg.vocab_divisor},
            "tied": cfg.tied, "iteration": job.iteration, "dropped": [d for d in dropped.split(",") if d],
            **({"optimizer": optim.store_attrs(job.optim)} if job.optim else {}),
        })
    comm.barrier()
    return {"arrays": len(plan.arrays), "bytes": sum(plan.owned_bytes(i) for i in range(len(plan.files)))}


# --- target phase --------------------------------------------------------------------------------

def rng_for(policy: str, src_layout: Layout, dst_layout: Layout, fp: FilePlan, encs: dict) -> str | None:
    """Which stored RNG state a target file gets (DESIGN §3): carry when TP and PP are unchanged."""
    if policy == "drop":
        return None
    same = src_layout.tp == dst_layout.tp and src_layout.pp == dst_layout.pp
    if policy in ("auto", "carry") and same:
        slot = "rng@" + fp.dirname
        if slot in encs:
            return slot
        if policy == "carry":
            raise BadInput(f"--rng carry: no source RNG state for {fp.dirname}")
    elif policy == "carry":
        raise BadInput("--rng carry needs the same TP and PP on both sides; use replicate or drop")
    first = sorted(k for k in encs if k.startswith("rng@"))
    return first[0] if first else None


def put_piece(store: Store, p, part: torch.Tensor, block: int, progress: Progress, mapped: bool) -> None:
    """One source piece into the store in blocks of whole chunk rows of at most `block` bytes."""
    lead = len(p.gbox.sizes) - len(p.local.sizes)
    if part.dim() == 0:
        store.write(p.array, p.gbox, part)
        progress.add(part.element_size())
        return
    row = part[0].numel() * part.element_size()
    align = store.array(p.array).chunks[lead]
    for r0, r1 in stream.row_blocks(part.shape[0], row, block, align):
        sub = part[r0:r1]
        offs = list(p.gbox.offsets)
        sizes = list(p.gbox.sizes)
        offs[lead] += r0
        sizes[lead] = r1 - r0
        store.write(p.array, Box(tuple(offs), tuple(sizes)), sub)
        if mapped:
            stream.release_pages(sub)
        progress.add(sub.numel() * sub.element_size())


def lazy_tensor(store: Store, item: TensorItem, block: int, progress: Progress) -> stream.LazyTensor:
    """A target tensor produced block by block (rows of dim 0) from the store when its file is written."""
    dtype = torch_dtype(item.dtype)
    shape = tuple(item.shape)
    vol = int(np.prod(shape)) if shape else 1
    full = item.covered == vol

    def fill(write):
        if not shape:
            t = torch.zeros((), dtype=dtype)
            for p in item.pieces:
                t = store.read(p.array, p.gbox).reshape(())
            write(t)
            progress.add(t.element_size())
            return
        row = (vol // shape[0]) * dtype.itemsize if shape[0] else 0
        for r0, r1 in stream.row_blocks(shape[0], row, block):
            lbox = Box((r0,) + (0,) * (len(shape) - 1), (r1 - r0,) + shape[1:])
            subs = list(_with_arrays(item, lbox))
            if full and len(subs) == 1 and subs[0][0][0] == lbox:   # one piece: the read is the block
                (lb, gb), arr = subs[0]
                t = store.read(arr, gb).reshape(lb.sizes)
            else:
                t = (torch.empty if full else torch.zeros)((r1 - r0,) + shape[1:], dtype=dtype)
                for (lb, gb), arr in subs:
                    t[lb.shift(tuple(-o for o in lbox.offsets)).slices] = store.read(arr, gb).reshape(lb.sizes)
            write(t)
            progress.add(t.numel() * t.element_size())
            del t

    return stream.LazyTensor(shape, dtype, fill)


def _with_arrays(item: TensorItem, lbox: Box):
    for p in item.pieces:
        s = stream.sub_piece(p, lbox)
        if s is not None:
            yield s, p.array


def build_file(store: Store, fp: FilePlan, common: dict, encs: dict, progress: Progress,
               block: int | None = None) -> dict:
    """The target file's state dict; with `block`, tensors are LazyTensors filled when the file is saved."""
    sd = dict(common)
    for chunk in fp.chunks:
        sd[chunk] = {}
    for item in fp.items:
        if isinstance(item, ObjectItem):
            enc = encs.get(item.slot)
            if enc is not None:
                sd[item.chunk][item.key] = get_object(store, item.slot, enc)
            else:  # the module's shard changed: its FP8 scaling state cannot follow
                sample = next((s for s in encs if s.startswith(item.gkey + "|")), None)
                sd[item.chunk][item.key] = empty_like_encoding(get_object(store, sample, encs[sample]) if sample else None)
            continue
        if block is not None:
            sd[item.chunk][item.key] = lazy_tensor(store, item, block, progress)
            continue
        dtype = torch_dtype(item.dtype)
        vol = int(np.prod(item.shape)) if item.shape else 1
        t = (torch.empty if item.covered == vol else torch.zeros)(item.shape, dtype=dtype)
        for p in item.pieces:
            t[p.local.slices] = store.read(p.array, p.gbox).reshape(p.local.sizes)
            progress.add(p.local.volume * t.element_size())
        sd[item.chunk][item.key] = t
    return sd


def open_target(job: Job):
    """The complete store a target phase reads, and what its attributes say: (store, attrs, family,
    config, source layout, target layout, object encodings)."""
    store = Store.open(Path(job.store))
    attrs = store.attrs
    if not attrs.get("complete"):
        raise BadInput(f"{job.store}: the store is incomplete (its source phase did not finish)")
    return (store, attrs, get_family(attrs["family"]), ModelConfig.from_json(attrs["config"]),
            Layout.from_json(attrs["source_layout"]), Layout.from_json(job.dst_layout), attrs["objects"])


def target_phase(job: Job, comm: Comm, progress: Progress) -> dict:
    if job.dst_format == "torch_dist":
        from ckptctl.formats import torch_dist
        return torch_dist.target_phase(job, comm, progress)
    store, attrs, family, cfg, src_layout, dst, encs = open_target(job)
    files = plan_target(family, cfg, dst, attrs["manifest"], attrs["arrays"], set(encs))
    common = get_object(store, COMMON, encs.get(COMMON, "none")) or {}
    iteration = attrs.get("iteration", "release")
    padded = cfg.vocab_for_tp(dst.tp) if cfg.true_vocab is not None else cfg.padded_vocab
    if "args" in common:
        common["args"] = _namespace(family.layout_args(
            legacy.rewrite_args(legacy.args_dict(common["args"]), dst, padded, cfg.num_layers), cfg, dst))
    out = Path(job.out)
    it_dir = out / legacy.iter_dirname(iteration)
    tside = None
    if attrs.get("optimizer"):
        tside = optim.TargetSide(family, cfg, dst, attrs["optimizer"], get_object(store, OPTIM_COMMON, encs[OPTIM_COMMON]),
                                   files=files)
    mine = assign([f.nbytes() + 1 for f in files], comm.world)[comm.rank]
    budget = stream.Budget(job.max_memory)
    from ckptctl.reshard import resume
    for i in mine:
        fp = files[i]
        if resume.target_done(job, i):   # finished by an interrupted run, its files intact (crc32c)
            progress.add(fp.nbytes())
            continue
        sd = build_file(store, fp, common, encs, progress, block=budget.block)
        if tside is not None:
            (it_dir / fp.dirname).mkdir(parents=True, exist_ok=True)
            progress.add(tside.write(store, fp, sd, it_dir / fp.dirname))
        slot = rng_for(job.rng, src_layout, dst, fp, encs)
        if slot is not None:
            sd["rng_state"] = get_object(store, slot, encs[slot])
        d = it_dir / fp.dirname
        d.mkdir(parents=True, exist_ok=True)
        stream.save_streaming(sd, d / legacy.MODEL_FILE)
        del sd
        resume.mark_target(job, i, d)
    progress.add(0, force=True)
    comm.barrier()
    if comm.rank == 0:
        legacy.write_tracker(out, iteration)
    comm.barrier()
    return {"files": len(files), "bytes": sum(f.nbytes() for f in files)}


def _namespace(d: dict):
    import argparse
    return argparse.Namespace(**d)


def run_job(job: Job) -> dict:
    """Run the job's phases in this process (one of the torchrun workers, or alone)."""
    configure()
    comm = Comm()
    progress = Progress(job.workdir, comm.rank)
    result = {}
    try:
        for name, phase in (("source", source_phase), ("target", target_phase)):
            if name in job.phases:
                t = time.monotonic()
                result[name] = phase(job, comm, progress)
                result[name]["seconds"] = round(time.monotonic() - t, 3)   # rank 0's, after its last barrier
    finally:
        comm.close()
    return result
