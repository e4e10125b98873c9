"""verify's reference gather and byte comparison: every global tensor of one checkpoint assembled from its
units (rank files or DCP chunks, opened through the format), never from the store; compared box by box,
raw bytes only (DESIGN §9). The report type is here too, so the optimizer comparison can fill it."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch

from ckptctl.box import Box
from ckptctl.core.diff import Difference, _bytes, _flat, _hex, _nd, byte_diff as _diff
from ckptctl.core.dtypes import torch_dtype
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
