"""`verify`: the reference gather of every global tensor from each checkpoint's rank files, compared
byte for byte (DESIGN §9; the gather and comparison: `verify_gather`, the optimizer: `verify_optim`). The
store is never consulted: this is the independent check of convert.
"""
from __future__ import annotations

from pathlib import Path

import torch

from ckptctl.box import Box
from ckptctl.convert import inspect
from ckptctl.core.diff import Difference
from ckptctl.core.dtypes import torch_dtype
from ckptctl.errors import BadInput
from ckptctl.formats.base import Source
from ckptctl.verify_gather import Gatherer, VerifyReport, compare_regions


def verify(a: Path, b: Path, true_vocab: int | None = None, max_memory: int | None = None,
           weights_only: bool = False, progress=None, nproc: int = 1) -> VerifyReport:
    """Compare every global tensor of `a` and `b` in boxes of at most a sixth of the memory budget
    left after the baseline (per side: the two boxes, a copy of each for replicas, the comparison).
    `nproc` > 1: the tensors are compared by that many forked workers (ckptctl.verify_parallel)."""
    import time
    from ckptctl import verify_store
    from ckptctl.reshard import stream
    if verify_store.is_store(a) or verify_store.is_store(b):   # a store side: verified as the checkpoint it holds
        with verify_store.materialized(a) as ma, verify_store.materialized(b) as mb:
            rep = verify(ma, mb, true_vocab, max_memory, weights_only, progress, nproc)
        rep.a, rep.b = str(a), str(b)
        return rep
    t0 = time.monotonic()
    sa, sb = inspect(Path(a), true_vocab), inspect(Path(b), true_vocab)
    if sa.family != sb.family:
        raise BadInput(f"{a} holds a {sa.family} model, {b} a {sb.family} model")
    rep = VerifyReport(str(a), str(b), str(sa.layout), str(sb.layout))
    limit = stream.Budget(max_memory, parts=6).block
    ga, gb = Gatherer(sa, release=True), Gatherer(sb, release=True)
    names_a, names_b = set(sa.plan.arrays), set(sb.plan.arrays)
    for name in sorted(names_a - names_b):
        rep.differences.append(Difference(name.removeprefix("model/"), f"only in {a}"))
    for name in sorted(names_b - names_a):
        rep.differences.append(Difference(name.removeprefix("model/"), f"only in {b}"))
    common = _ordered(sa, names_a & names_b)
    task = progress.add_task(f"verify {sa.layout} vs {sb.layout}: weights", total=max(1, _nbytes(sa, common))) if progress else None
    if nproc > 1 and len(common) > 1:
        from ckptctl import verify_parallel
        moved = [0]

        def done(n):
            moved[0] += n
            if task is not None:
                progress.update(task, completed=moved[0])
        verify_parallel.compare(common, {n: _nbytes(sa, [n]) for n in common}, compare_one, sa, sb, limit, rep,
                                nproc, done)
    else:
        for name in common:
            if task is not None:
                progress.update(task, completed=rep.bytes_compared)
            compare_one(name, sa, sb, ga, gb, rep, limit)
    if task is not None:
        progress.update(task, completed=rep.bytes_compared)
    rep.weights_only = weights_only
    if not weights_only:   # --weights-only: a fine-tuning copy converted with --no-optimizer can verify green
        from ckptctl.verify_optim import verify_optimizer
        verify_optimizer(sa, sb, rep)
        from ckptctl import optim_ranks   # every rank file's param groups and step, not only the first's
        optim_ranks.check(sa, rep, "a")
        optim_ranks.check(sb, rep, "b")
        _compare_state(sa, sb, rep)
    rep.seconds = round(time.monotonic() - t0, 3)
    return rep


def compare_one(name: str, sa: Source, sb: Source, ga: Gatherer, gb: Gatherer, rep: VerifyReport, limit: int) -> None:
    """One global tensor of both sides, gathered box by box and compared into `rep`."""
    rep.tensors += 1
    replicas: dict[str, Difference] = {}
    compare_regions(name, _reader(ga, name, replicas), _reader(gb, name, replicas), _spec(sa, name), _spec(sb, name),
                    sa.plan.arrays[name].get("vocab", False), rep, limit)
    rep.differences.extend(replicas.values())


def _nbytes(src: Source, names: list[str]) -> int:
    """Bytes of the named global arrays of one side (the verify progress total)."""
    n = 0
    for name in names:
        shape, dt = _spec(src, name)
        v = torch.empty((), dtype=dt).element_size()
        for d in shape:
            v *= d
        n += v
    return n


def _spec(src: Source, name: str) -> tuple:
    spec = src.plan.arrays[name]
    return tuple(spec["shape"]), torch_dtype(spec["dtype"])


def _reader(g: Gatherer, name: str, replicas: dict):
    """box -> that box of the global array; replica differences merge over boxes (one per replica)."""
    def read(box: Box) -> torch.Tensor:
        t, problems = g.region(name, box)
        for p in problems:
            seen = replicas.setdefault(f"{id(g)}:{p.where}", p)
            if seen is not p:
                seen.count += p.count
                seen.first_index = min(seen.first_index, p.first_index)
        return t
    return read


def _ordered(src: Source, names: set[str]) -> list[str]:
    return [n for n in src.plan.arrays if n in names]


def _compare_state(sa: Source, sb: Source, rep: VerifyReport) -> None:
    """Non-tensor state: iteration and version must match; rewritten args and RNG are reported."""
    first_a = sa.common_state()
    first_b = sb.common_state()
    for k in ("iteration", "checkpoint_version"):
        if first_a.get(k) != first_b.get(k):
            rep.differences.append(Difference(k, f"differs: {first_a.get(k)!r} vs {first_b.get(k)!r}"))
    objs = sum(len(fp.objects) for fp in sa.plan.files)
    if objs:
        rep.allowed.append({"key": "_extra_state", "reason": f"{objs} entries listed, excluded from equality"})
    rep.allowed.append({"key": "rng_state", "reason": "per-rank RNG streams are not compared"})
    aa, ab = sa.ckpt.args, sb.ckpt.args
    changed = sorted(k for k in set(aa) | set(ab) if repr(aa.get(k)) != repr(ab.get(k)))
    if changed:
        rep.allowed.append({"key": "args", "reason": "fields differ: " + ", ".join(changed)})
