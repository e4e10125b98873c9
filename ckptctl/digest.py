"""`ckptctl digest CKPT`: a fingerprint of a checkpoint's model and optimizer state that does not depend on
its parallel layout or format (issue 13; the hash scheme: `ckptctl.core.fingerprint`).

Each global tensor is assembled by verify's reference gather (`verify_gather.Gatherer`, box by box within
`--max-memory`) and hashed as its canonical bytes: the C-order bytes of the global tensor, vocab arrays cut
to the true vocabulary's rows (padding rows depend on TP and convert drops or zero-fills them, as verify
allows; without a known true vocab the padded rows are hashed and the note says so). Optimizer state is
the per-parameter fp32 master / exp_avg / exp_avg_sq of verify's optimizer gather, named
`optim/<comp>/<param>`, whatever the optimizer's sharding. Included besides: iteration, checkpoint
version, the architecture fields of the model config, the optimizer's step and each parameter's
param-group hyperparameters. Not included (layout- or run-dependent): args, RNG state, `_extra_state`,
the optimizer's variant (distributed or not) and per-rank bookkeeping.

Work is cut into units of whole 16 MiB blocks of one tensor (or a run of optimizer parameters) spread
over `nproc` forked workers, each opening the units it needs (as `verify --nproc`); the parent combines
the block hashes in order, so the root is the same for any `nproc`. Replica copies that differ from
their owner are reported (the owner's bytes are hashed, as convert takes them).
"""
from __future__ import annotations

import multiprocessing
import time
from concurrent.futures import FIRST_EXCEPTION, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from ckptctl.core import fingerprint as fpr
from ckptctl.core.dtypes import torch_dtype
from ckptctl.errors import WorkerFailure
from ckptctl.verify_gather import Gatherer, blocks

CONFIG_FIELDS = ("family", "num_layers", "hidden", "heads", "groups", "kv_channels", "ffn", "glu", "tied",
                 "true_vocab", "vocab_divisor", "num_experts", "moe_ffn")
RECORD = "ckptctl-digest.json"   # `convert --digest` writes the source's digest here, at DST's top level


@dataclass
class DigestReport:
    path: str
    family: str
    format: str
    layout: str
    root: str = ""
    algorithm: str = fpr.ALGORITHM
    scheme: str = fpr.VERSION
    block_bytes: int = fpr.BLOCK
    tensors: list[dict] = field(default_factory=list)     # name, dtype, shape, bytes, hash (sorted by name)
    objects: dict = field(default_factory=dict)           # name -> {"value", "hash"}
    bytes: int = 0
    seconds: float = 0.0
    nproc: int = 1
    replicas_differ: list[dict] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.replicas_differ

    def to_json(self) -> dict:
        d = asdict(self)
        d["ok"] = self.ok
        d["gbps"] = round(self.bytes / self.seconds / 1e9, 3) if self.seconds else None
        return d


def canonical_rows(src, array: str, shape: tuple) -> tuple:
    """The canonical shape of a global array: vocab arrays keep the true vocabulary's rows."""
    tv = src.cfg.true_vocab
    if src.plan.arrays[array].get("vocab", False) and tv is not None and shape and shape[0] > tv:
        return (tv,) + tuple(shape[1:])
    return tuple(shape)


def _units(src, nproc: int) -> tuple[list[tuple], dict]:
    """The work: ("model", array, start, stop) per segment of whole blocks, ("optim", arrays) per run of
    parameters in the checkpoint's order (a run's rank files are decoded once); and the (canonical shape,
    dtype, bytes) of every array hashed, model and optimizer."""
    specs, total = {}, 0
    for a, s in src.plan.arrays.items():
        dt = torch_dtype(s["dtype"])
        shape = canonical_rows(src, a, tuple(s["shape"]))
        n = torch.empty((), dtype=dt).element_size()
        for d in shape:
            n *= d
        specs[a] = (shape, dt, n)
        total += n
    # Enough units to keep every worker busy to the end, none smaller than a block.
    seg = fpr.BLOCK if nproc <= 1 else max(fpr.BLOCK, min(1 << 30, total // (nproc * 8)))
    if not src.format.memory_mapped:   # a box read loads its whole chunk: segments of a tensor would load it twice
        seg = max(seg, 256 << 20)
    units = [("model", a, s0, s1) for a, (_, _, n) in specs.items() for s0, s1 in
             (fpr.segments(n, seg) if nproc > 1 else [(0, n)])]
    if getattr(src, "optim", None) is not None:
        from ckptctl.optstate.params import optim_array
        arrays = list(src.format.optim_gather(src).arrays())
        for a in arrays:   # the optimizer's state is fp32 per parameter, whatever the weights' dtype
            shape = specs[a][0]
            for c in src.optim["comps"]:
                specs[optim_array(a, c)] = (shape, torch.float32, 4 * specs[a][2] // specs[a][1].itemsize)
        size = {a: specs[a][2] // specs[a][1].itemsize * 4 * len(src.optim["comps"]) for a in arrays}
        runs = max(1, min(len(arrays), nproc))   # each run decodes the rank files its parameters live in
        share, cur, acc = sum(size.values()) / runs, [], 0
        for a in arrays:
            cur.append(a)
            acc += size[a]
            if acc >= share:
                units.append(("optim", tuple(cur)))
                cur, acc = [], 0
        if cur:
            units.append(("optim", tuple(cur)))
        size.update({("optim", u[1]): sum(size[a] for a in u[1]) for u in units if u[0] == "optim"})
    else:
        size = {}
    # Largest first (an optimizer run, which also decodes its rank files, counts its fp32 bytes): no
    # worker starts a big unit when the others are done.
    units.sort(key=lambda u: -(u[3] - u[2] if u[0] == "model" else size[u]))
    return units, specs


class _Worker:
    """One process's gatherers (its own opened units) and the hashing of one unit."""

    def __init__(self, src, specs: dict, limit: int):
        self.src, self.specs, self.limit = src, specs, limit
        self.g = Gatherer(src, release=True)

    def run(self, unit: tuple) -> tuple[dict, list, int]:
        """{name: (start, block hashes)}, replica problems, bytes hashed."""
        if unit[0] == "model":
            return self._model(*unit[1:])
        return self._optim(unit[1])

    def _model(self, array: str, start: int, stop: int):
        shape, dt, _ = self.specs[array]
        item = dt.itemsize
        h, problems = fpr.BlockHasher(start, stop), []
        for fb in fpr.flat_boxes(shape, start // item, stop // item):
            for bx in blocks(fb.sizes, item, self.limit):
                t, probs = self.g.region(array, bx.shift(fb.offsets))
                problems += [_problem(p) for p in probs]
                h.update(_raw(t))
                del t
        return {array: (start, h.finish())}, problems, stop - start

    def _optim(self, arrays: tuple):
        from ckptctl.optstate.params import optim_array
        og = self.src.format.optim_gather(self.src)   # per run: its decoded rank files are freed after it
        out, problems, n = {}, [], 0
        for a in arrays:
            for c in self.src.optim["comps"]:
                t, probs = og.gather(a, c)
                problems += [_problem(p) for p in probs]
                t = t[: canonical_rows(self.src, a, tuple(t.shape))[0]] if t.dim() else t
                h = fpr.BlockHasher(0, t.numel() * t.element_size())
                h.update(_raw(t))
                out[optim_array(a, c)] = (0, h.finish())
                n += t.numel() * t.element_size()
        return out, problems, n


def _raw(t: torch.Tensor):
    return t.contiguous().reshape(-1).view(torch.uint8).numpy()


def _problem(d) -> dict:
    return {"tensor": d.key, "where": d.where, "count": d.count, "first_index": d.first_index}


_JOB: tuple | None = None        # (src, specs, limit): set by the parent, inherited by the forked workers
_WORKER: _Worker | None = None


def _start() -> None:
    torch.set_num_threads(1)    # N workers on N cores: intra-op threads would only compete
    from ckptctl.reshard import stream
    stream.fixed_mmap_threshold()


def _one(unit: tuple):
    global _WORKER
    if _WORKER is None:
        _WORKER = _Worker(*_JOB)
    return _WORKER.run(unit)


def _run_parallel(units: list, src, specs: dict, limit: int, nproc: int, done) -> list:
    global _JOB
    _JOB = (src, specs, limit)
    results = [None] * len(units)
    pool = ProcessPoolExecutor(max_workers=nproc, mp_context=multiprocessing.get_context("fork"), initializer=_start)
    try:
        futures = {pool.submit(_one, u): i for i, u in enumerate(units)}
        pending = set(futures)
        while pending:
            finished, pending = wait(pending, return_when=FIRST_EXCEPTION)
            for f in finished:
                results[futures[f]] = f.result()   # a worker's error is raised here; the rest are cancelled
                done(results[futures[f]][2])
    except BrokenProcessPool:
        n = sum(r is not None for r in results)
        raise WorkerFailure(f"a digest worker died (killed by a signal or out of memory?) after {n} of {len(units)} "
                            f"units; try fewer workers (--nproc) or a smaller --max-memory") from None
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
        _JOB = None
    return results


def digest(path: Path, true_vocab: int | None = None, max_memory: int | None = None, nproc: int = 1,
           progress=None) -> DigestReport:
    """The layout-free digest of the checkpoint (or store) at `path`."""
    from ckptctl import verify_store
    if verify_store.is_store(path):   # a store: digested as the checkpoint it holds, written out first
        with verify_store.materialized(path) as m:
            rep = digest(m, true_vocab, max_memory, nproc, progress)
        rep.path = str(path)
        return rep
    from ckptctl.convert import inspect
    from ckptctl.reshard import stream
    t0 = time.monotonic()
    src = inspect(Path(path), true_vocab)
    rep = DigestReport(str(path), src.family, src.fmt, str(src.layout), nproc=max(1, nproc), block_bytes=fpr.BLOCK)
    limit = stream.Budget(max_memory, parts=3).block   # one box, its bytes view, the hash's input
    units, specs = _units(src, nproc)
    total = sum(s[2] for s in specs.values())
    task = progress.add_task(f"digest {src.layout}", total=max(1, total)) if progress else None
    moved = [0]

    def done(n):
        moved[0] += n
        if task is not None:
            progress.update(task, completed=moved[0])
    if nproc > 1 and len(units) > 1:
        results = _run_parallel(units, src, specs, limit, nproc, done)
    else:
        w, results = _Worker(src, specs, limit), []
        for u in units:
            results.append(w.run(u))
            done(results[-1][2])
    parts: dict[str, list] = {}
    for blocks_by_name, problems, n in results:
        rep.bytes += n
        rep.replicas_differ += problems
        for name, (start, hashes) in blocks_by_name.items():
            parts.setdefault(name, []).append((start, hashes))
    entries = {}
    for name in sorted(parts):
        shape, dt, nbytes = specs[name]
        hashes = [h for _, hs in sorted(parts[name], key=lambda p: p[0]) for h in hs]
        dts = str(dt).removeprefix("torch.")
        th = fpr.tensor_hash(name, dts, shape, hashes)
        rep.tensors.append({"name": name, "dtype": dts, "shape": list(shape), "bytes": nbytes, "hash": th})
        entries[name] = th
    for name, value in _objects(src).items():
        rep.objects[name] = {"value": value, "hash": fpr.object_hash(name, value)}
        entries[name] = rep.objects[name]["hash"]
    rep.root = fpr.root_hash(entries)
    if src.cfg.true_vocab is None and any(s.get("vocab") for s in src.plan.arrays.values()):
        rep.notes.append("true vocabulary size unknown: vocab padding rows are hashed, so this digest depends on "
                         "TP; pass --true-vocab-size")
    rep.seconds = round(time.monotonic() - t0, 3)
    return rep


def _objects(src) -> dict:
    """The layout-free non-tensor state hashed into the root (see the module's docstring)."""
    common = src.common_state()
    cfg = src.cfg.to_json()
    out = {"state/iteration": common.get("iteration"), "state/checkpoint_version": common.get("checkpoint_version"),
           "state/config": {k: cfg.get(k) for k in CONFIG_FIELDS}}
    if getattr(src, "optim", None) is not None:
        og = src.format.optim_gather(src)
        out["optim/step"] = repr(og.common().get("step"))
        groups: dict[str, list] = {}   # hyperparameters -> the parameters that have them (compact, sorted)
        for a, g in og.groups_by_array().items():
            groups.setdefault(g, []).append(a)
        out["optim/param_groups"] = {g: sorted(arrays) for g, arrays in sorted(groups.items())}
    return out
