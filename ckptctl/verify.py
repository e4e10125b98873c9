"""`verify`: the reference gather of every global tensor from each checkpoint's rank files, compared
byte for byte (DESIGN §9). The store is never consulted: this is the independent check of convert.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from ckptctl.box import Box
from ckptctl.convert import inspect
from ckptctl.core.diff import Difference, _bytes, _flat, _hex, _nd, byte_diff as _diff  # noqa: F401
from ckptctl.core.dtypes import torch_dtype
from ckptctl.errors import BadInput
from ckptctl.formats.base import Source


@dataclass
class VerifyReport:
    a: str
    b: str
    layout_a: str
    layout_b: str
    tensors: int = 0
    equal: int = 0
    bytes_compared: int = 0
    differences: list[Difference] = field(default_factory=list)
    allowed: list[dict] = field(default_factory=list)     # reported, fail only with --strict
    table: list[dict] = field(default_factory=list)       # one row per tensor
    seconds: float = 0.0
    weights_only: bool = False                            # optimizer and training state not compared

    @property
    def ok(self) -> bool:
        return not self.differences

    def to_json(self) -> dict:
        d = asdict(self)
        d["ok"] = self.ok
        return d


class Gatherer:
    """Assembles global tensors of one checkpoint, or boxes of them, from its rank files (memory-mapped,
    opened once). With `release`, the mapped pages under every piece read are dropped after the copy,
    so the process's RSS holds the regions being compared, never the rank files."""

    def __init__(self, src: Source, release: bool = False):
        self.src = src
        self.open = src.opener()
        self.release = release and src.format.memory_mapped   # units are memory-mapped files
        self._units: dict[str, object] = {}
        self._files = {fp.dirname: fp for fp in src.plan.files}
        self.by_array: dict[str, list] = {}
        for fp in src.plan.files:
            for t in fp.tensors:
                for p, owned in zip(t.pieces, t.owned):
                    self.by_array.setdefault(p.array, []).append((fp.dirname, t, p, owned))

    def unit(self, dirname: str):
        """The opened rank file (legacy) or chunk reader (torch_dist), opened once."""
        if dirname not in self._units:
            self._units[dirname] = self.open(self._files[dirname])
        return self._units[dirname]

    def gather(self, array: str) -> tuple[torch.Tensor, list[Difference]]:
        shape = tuple(self.src.plan.arrays[array]["shape"])
        return self.region(array, Box((0,) * len(shape), shape))

    def region(self, array: str, box: Box) -> tuple[torch.Tensor, list[Difference]]:
        """The global array's values inside `box`; replicas inside it are checked against the owner."""
        from ckptctl.reshard import stream
        out = torch.empty(box.sizes, dtype=torch_dtype(self.src.plan.arrays[array]["dtype"]))
        problems = []
        back = tuple(-o for o in box.offsets)
        for dirname, t, p, owned in sorted(self.by_array[array], key=lambda e: not e[3]):   # owners first
            inter = p.gbox.intersect(box) if box.sizes else p.gbox
            if inter is None:
                continue
            lead = len(p.gbox.sizes) - len(p.local.sizes)   # leading global axes (experts) the local tensor lacks
            lbox = Box(tuple(lo + i - g for lo, i, g in zip(p.local.offsets, inter.offsets[lead:], p.gbox.offsets[lead:])),
                       inter.sizes[lead:])
            unit = self.unit(dirname)
            view = unit.tensor(t)[lbox.slices]
            local = view.reshape(inter.sizes)
            dest = inter.shift(back)
            if owned:
                out[dest.slices] = local
            else:
                # A replica (TP copy of a norm, tied output copy, duplicated experts): must be byte-equal.
                d = _diff(out[dest.slices], local)
                if d is not None:
                    count, idx = d
                    at = [i + o - g for i, o, g in zip(_nd(inter.sizes, idx), inter.offsets, p.gbox.offsets)]
                    problems.append(Difference(array.removeprefix("model/"), "replica differs", count=count,
                                               first_index=_flat(at, p.gbox.sizes), where=f"{dirname}/{t.chunk}[{t.key}]"))
            if self.release:
                stream.release_pages(view)
        return out, problems


def blocks(shape: tuple[int, ...], itemsize: int, limit: int | None) -> list[Box]:
    """Row-major boxes that tile `shape`, each at most `limit` bytes (at least one element): whole
    rows of dim 0 when a row fits, else rows of the first dim whose rows fit, one index above it."""
    if not shape:
        return [Box((), ())]
    if any(s == 0 for s in shape):
        return []
    if limit is None:
        return [Box((0,) * len(shape), tuple(shape))]

    def slab(k: int) -> int:   # bytes of one index along dim k
        n = itemsize
        for s in shape[k + 1:]:
            n *= s
        return n
    k = 0
    while k < len(shape) - 1 and slab(k) > limit:
        k += 1
    n = max(1, limit // slab(k))
    import itertools
    out = []
    for outer in itertools.product(*(range(s) for s in shape[:k])):
        for r in range(0, shape[k], n):
            m = min(n, shape[k] - r)
            out.append(Box(tuple(outer) + (r,) + (0,) * (len(shape) - k - 1), (1,) * k + (m,) + tuple(shape[k + 1:])))
    return out


def compare_regions(name: str, read_a, read_b, spec_a: tuple, spec_b: tuple, vocab: bool, rep: VerifyReport,
                    limit: int | None = None) -> None:
    """Compare two global arrays box by box (`read_x(box)` -> tensor; spec = (shape, torch dtype)),
    at most `limit` bytes per box and side. Vocab arrays compare their common rows; rows only the
    target has must be zero."""
    (sa, da), (sb, db) = (tuple(spec_a[0]), spec_a[1]), (tuple(spec_b[0]), spec_b[1])
    key = name.removeprefix("model/")
    row = {"key": key, "dtype": str(da).removeprefix("torch."), "shape": list(sa), "status": "equal"}
    if da != db or (sa != sb and not vocab) or (vocab and sa[1:] != sb[1:]):
        rep.differences.append(Difference(key, "dtype or shape differs", str(da), str(db), list(sa), list(sb)))
        rep.table.append({**row, "status": "dtype/shape differs"})
        return
    itemsize = torch.empty((), dtype=da).element_size()
    common = sa
    if vocab and sa[0] != sb[0]:
        # Padded vocab rows: compare the common rows; rows only one side has are padding.
        n = min(sa[0], sb[0])
        longer, which, read = (sa, "a", read_a) if sa[0] > sb[0] else (sb, "b", read_b)
        if which == "b" and any(bool((_bytes(read(bx.shift((n,) + (0,) * (len(sa) - 1)))) != 0).any())
                                for bx in blocks((longer[0] - n,) + sa[1:], itemsize, limit)):
            rep.differences.append(Difference(key, "padding rows added by the target are not zero",
                                              shape_a=list(sa), shape_b=list(sb)))
        else:
            rep.allowed.append({"key": key, "reason": f"vocab padding rows {n}..{longer[0]} exist only in {which}"})
        common = (n,) + sa[1:]
        row["status"] = "equal (common vocab rows)"
    count, first = 0, None
    for bx in blocks(common, itemsize, limit):
        ta, tb = read_a(bx), read_b(bx)
        d = _diff(ta, tb)
        if d is not None:
            count += d[0]
            if first is None:
                at = [i + o for i, o in zip(_nd(bx.sizes, d[1]), bx.offsets)]
                first = (_flat(at, common), at, _hex(ta, d[1]), _hex(tb, d[1]))
        del ta, tb
    vol = 1
    for s in common:
        vol *= s
    rep.bytes_compared += vol * itemsize
    if first is None:
        rep.equal += 1
    else:
        rep.differences.append(Difference(key, "bytes differ", str(da), str(db), list(sa), list(sb), count, *first))
        row["status"] = f"{count} elements differ"
    rep.table.append(row)


def compare_arrays(name: str, a: torch.Tensor, b: torch.Tensor, vocab: bool, rep: VerifyReport) -> None:
    """Two whole global tensors in memory (the optimizer's gather): `compare_regions` in one box."""
    compare_regions(name, lambda bx: a[bx.slices], lambda bx: b[bx.slices], (a.shape, a.dtype), (b.shape, b.dtype),
                    vocab, rep)


def verify(a: Path, b: Path, true_vocab: int | None = None, max_memory: int | None = None,
           weights_only: bool = False, progress=None) -> VerifyReport:
    """Compare every global tensor of `a` and `b` in boxes of at most a sixth of the memory budget
    left after the baseline (per side: the two boxes, a copy of each for replicas, the comparison)."""
    import time
    from ckptctl import verify_store
    from ckptctl.reshard import stream
    if verify_store.is_store(a) or verify_store.is_store(b):   # a store side: verified as the checkpoint it holds
        with verify_store.materialized(a) as ma, verify_store.materialized(b) as mb:
            rep = verify(ma, mb, true_vocab, max_memory, weights_only, progress)
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
    for name in common:
        if task is not None:
            progress.update(task, completed=rep.bytes_compared)
        rep.tensors += 1
        replicas: dict[str, Difference] = {}
        compare_regions(name, _reader(ga, name, replicas), _reader(gb, name, replicas), _spec(sa, name), _spec(sb, name),
                        sa.plan.arrays[name].get("vocab", False), rep, limit)
        rep.differences.extend(replicas.values())
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
