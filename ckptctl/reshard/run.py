"""The worker: executes the plan. Source phase (rank files -> store), target phase (store -> rank files).

Every worker computes the same plan from the job (the planner is pure and deterministic), takes its
share of the files, and touches only the store regions the plan gives it.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ckptctl.core.dtypes import itemsize
from ckptctl.errors import BadInput
from ckptctl.formats import registry
from ckptctl.layout import Layout
from ckptctl.models import get_family
from ckptctl.models.config import ModelConfig
from ckptctl.optstate.state import store_attrs
from ckptctl.reshard.comm import Comm, assign
from ckptctl.reshard import stream
from ckptctl.storage.build import build_file, lazy_tensor  # noqa: F401 - the phases' file builder
from ckptctl.storage.objects import COMMON, OPTIM_COMMON, get_object, put_object, rng_for  # noqa: F401
from ckptctl.storage.bulk_objects import ObjectRows
from ckptctl.storage.progress import Progress
from ckptctl.storage.trace import span
from ckptctl.store import FORMAT, FORMAT_VERSION, Store, configure



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
    optim: dict | None = None                  # ckptctl.optstate.state.inspect_info: the source's optimizer variant (None: not converted)
    max_memory: int | None = None              # per-worker RSS budget in bytes (ckptctl.reshard.stream)
    optim_sharding: str | None = None          # torch_dist target: distributed-optimizer sharding type
    format_options: dict = field(default_factory=dict)   # the target format's --format-option KEY=VALUE, checked
    refs: bool = False                         # hidden store: chunks reference source byte ranges (storage.refs)

    def save(self, path: Path) -> None:
        Path(path).write_text(json.dumps(self.__dict__))

    @classmethod
    def load(cls, path: Path) -> "Job":
        return cls(**json.loads(Path(path).read_text()))


# --- source phase --------------------------------------------------------------------------------

@dataclass(frozen=True)
class SourceUnit:
    """What one worker reads in the source phase: tensors `tensors` (indices into the file's) of source
    file `file`; part 0 also carries the file's objects, RNG and optimizer state."""

    file: int
    part: int
    parts: int
    tensors: tuple[int, ...]
    nbytes: int

    @property
    def mark(self) -> str:   # the --resume mark; the split is in the name, so another --nproc redoes it
        return str(self.file) if self.parts == 1 else f"{self.file}.{self.part}of{self.parts}"


def source_units(plan, world: int) -> list[SourceUnit]:
    """A unit per source file, or, with more workers than files, each file's tensors cut into about
    `world * share` parts of about equal bytes (in file order): 16 workers on 4 rank files all read and
    checksum, instead of 4 while 12 wait at the barrier."""
    sizes = [plan.owned_bytes(i) for i in range(len(plan.files))]
    total = sum(sizes) or 1
    units = []
    for i, fp in enumerate(plan.files):
        per = [(j, sum(p.local.volume * itemsize(t.dtype) for p, o in zip(t.pieces, t.owned) if o))
               for j, t in enumerate(fp.tensors) if any(t.owned)]
        want = max(1, min(len(per), round(world * sizes[i] / total))) if world > len(plan.files) else 1
        cuts: list[list[tuple[int, int]]] = [[]]
        goal = sizes[i] / want
        acc = 0
        for j, n in per:
            if cuts[-1] and acc + n / 2 > goal * len(cuts) and len(cuts) < want:
                cuts.append([])
            cuts[-1].append((j, n))
            acc += n
        units += [SourceUnit(i, k, len(cuts), tuple(j for j, _ in c), sum(n for _, n in c))
                  for k, c in enumerate(cuts)]
    return units


def source_phase(job: Job, comm: Comm, progress: Progress) -> dict:
    family = get_family(job.family)
    cfg = ModelConfig.from_json(job.cfg)
    layout = Layout.from_json(job.src_layout)
    fmt = registry.get(job.src_format)
    plan = fmt.source_plan(family, cfg, layout, job.inventories, job.dist)
    open_unit = fmt.unit_opener(layout, job.inventories, job.dist)
    oside = fmt.optim_source(family, cfg, layout, job.optim, plan, job.dist) if job.optim else None
    own_units = getattr(oside, "run", None)       # torch_dist: decodes per model-parallel rank, not per unit
    from ckptctl.reshard import resume
    keep = resume.keep_store(job)   # --resume: an interrupted run's store and finished files are kept
    if comm.rank == 0 and not keep:
        Store.create(Path(job.store), {}, {"format": FORMAT, "complete": False})
    comm.barrier()
    store = Store.open(Path(job.store), mode="r+")
    arrays = {**plan.arrays, **(oside.arrays() if oside else {})}
    from ckptctl.storage.refs import RefWriter, arrays_doc, finish
    store.add_arrays({a: arrays[a] for a in sorted(arrays)[comm.rank::comm.world]},   # creating costs ms each
                     existing_ok=keep, doc=arrays_doc(comm.rank) if job.refs else None)
    comm.barrier()
    units = source_units(plan, comm.world)
    mine = assign([u.nbytes + 1 for u in units], comm.world)[comm.rank]
    budget = stream.Budget(job.max_memory)
    encodings: dict[str, str] = {}
    refw = RefWriter(store, comm.rank) if job.refs else None
    for u in (units[k] for k in mine):
        i, fp = u.file, plan.files[u.file]
        done = resume.source_done(job, u.mark) if keep else None
        if done is not None:
            encodings.update(done)
            progress.add(u.nbytes)
            continue
        before = dict(encodings)
        sd = open_unit(fp)
        for t in (fp.tensors[j] for j in u.tensors):
            tensor = sd.tensor(t)
            if tuple(tensor.shape) != t.shape or str(tensor.dtype).removeprefix("torch.") != t.dtype:
                raise BadInput(f"{fp.dirname}: tensor {t.key!r} changed since inspection")
            mapped = fmt.memory_mapped   # memory-mapped rank file: pages can be dropped
            where = refw and getattr(sd, "locate", lambda _: None)(tensor)
            for p, owned in zip(t.pieces, t.owned):
                if owned and not (where and refw.put(p, tensor, where, progress, mapped)):
                    stream.put_rows(store, p, tensor[p.local.slices], budget.block, progress, mapped)
        if u.part:   # objects, RNG and optimizer state go with a file's first part
            del sd
            if refw is not None:
                refw.flush()
            resume.mark_source(job, u.mark, {})
            continue
        rows = ObjectRows(store, i, len(plan.files))   # this file's objects: one row per kind, written at once
        for o in fp.objects:
            if plan.slots[o.slot] == i:
                rows.put(o.slot, sd.object(o))
        for slot, value in sd.rng().items():
            rows.put(slot, value)
        encodings.update(rows.flush())
        if oside is not None and own_units is None:
            st = oside.write_file(store, i, fp, sd.sd, Path(job.inventories[i]["path"]), progress, budget.block)
            if i == 0:
                encodings[OPTIM_COMMON] = put_object(store, OPTIM_COMMON, st.common)
        if i == 0:
            encodings[COMMON] = put_object(store, COMMON, sd.common())
            encodings["__dropped__"] = ",".join(k for k in sd.dropped() if not (oside and k == "optimizer"))
        del sd
        if refw is not None:
            refw.flush()   # before the unit is marked done: a resumed run finds its references
        resume.mark_source(job, u.mark, {k: v for k, v in encodings.items() if k not in before or before[k] != v})
    if own_units is not None:
        encodings.update(own_units(store, comm, progress))
    progress.add(0, force=True)
    gathered = comm.all_gather_object(encodings)   # also: every worker's pieces are in the store now
    from ckptctl.reshard import replicas
    replicas.check(store, plan, [units[k].file for k in mine if not units[k].part], open_unit, comm)   # replicated tensors byte-equal to the stored copy
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
            **({"optimizer": store_attrs(job.optim)} if job.optim else {}),
        })
        if job.refs:
            finish(store)
    comm.barrier()
    return {"arrays": len(plan.arrays), "bytes": sum(plan.owned_bytes(i) for i in range(len(plan.files)))}


# --- target phase --------------------------------------------------------------------------------

def target_phase(job: Job, comm: Comm, progress: Progress) -> dict:
    """Every worker: its share of the target files, written by the target format."""
    return registry.get(job.dst_format).target_phase(job, comm, progress)


def run_job(job: Job) -> dict:
    """Run the job's phases in this process (one of the torchrun workers, or alone)."""
    configure()
    comm = Comm()
    progress = Progress(job.workdir, comm.rank)
    result = {}
    try:
        for name, phase in (("source", source_phase), ("target", target_phase)):
            if name in job.phases:
                t, t_wall = time.monotonic(), time.time()
                result[name] = phase(job, comm, progress)
                result[name]["seconds"] = round(time.monotonic() - t, 3)   # rank 0's, after its last barrier
                span(comm.rank, name, t_wall)
    finally:
        progress.close()
        comm.close()
    return result
