"""Half-open boxes in a tensor's index space: the one overlap rule everything uses."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Box:
    """`offsets[d]` inclusive start, `sizes[d]` length along dim d: the box is [offsets, offsets+sizes)."""

    offsets: tuple[int, ...]
    sizes: tuple[int, ...]

    @classmethod
    def full(cls, shape) -> "Box":
        return cls((0,) * len(shape), tuple(map(int, shape)))

    @property
    def volume(self) -> int:
        v = 1
        for s in self.sizes:
            v *= s
        return v

    @property
    def slices(self) -> tuple[slice, ...]:
        return tuple(slice(o, o + s) for o, s in zip(self.offsets, self.sizes))

    def intersect(self, other: "Box") -> "Box | None":
        offs, sizes = [], []
        for a, la, b, lb in zip(self.offsets, self.sizes, other.offsets, other.sizes):
            lo, hi = max(a, b), min(a + la, b + lb)
            if hi <= lo:
                return None
            offs.append(lo)
            sizes.append(hi - lo)
        return Box(tuple(offs), tuple(sizes))

    def shift(self, delta: tuple[int, ...]) -> "Box":
        return Box(tuple(o + d for o, d in zip(self.offsets, delta)), self.sizes)

    def to_json(self) -> list:
        return [list(self.offsets), list(self.sizes)]

    @classmethod
    def from_json(cls, j) -> "Box":
        return cls(tuple(j[0]), tuple(j[1]))


def find_overlap(boxes) -> tuple[int, int] | None:
    """Indices (i, j), i < j, of two boxes of `boxes` that overlap, or None when they are disjoint.

    Never compares all pairs: the boxes are cut into slabs along one dimension after another (every
    box in a slab overlaps the others on the dimensions already cut), and on the last dimension each
    slab is swept in start order against the box reaching furthest so far. For the boxes a sharding
    rule produces (each box lies in one slab per dimension) that is O(n log n) with fewer than n
    `intersect` calls; a box spanning several slabs is visited once per slab.
    """
    live = [i for i, b in enumerate(boxes) if b.volume]    # empty boxes overlap nothing
    if len(live) < 2:
        return None
    ndim = len(boxes[live[0]].offsets)
    if ndim == 0:
        return live[0], live[1]
    # Cut first along the dimensions that put the fewest boxes into several slabs.
    cost = []
    for d in range(ndim):
        extents = _extents(boxes, live, d)
        cuts = _cuts(extents)
        spans = 0
        for e, members in extents.items():
            a, b = _slab_range(cuts, e)
            spans += len(members) * (b - a)
        cost.append((spans, d))
    return _overlap(boxes, live, [d for _, d in sorted(cost)])


def _extents(boxes, idx: list[int], d: int) -> dict[tuple[int, int], list[int]]:
    """Boxes grouped by their [start, end) along d (few distinct ones: one per shard position)."""
    out: dict[tuple[int, int], list[int]] = {}
    for i in idx:
        o = boxes[i].offsets[d]
        out.setdefault((o, o + boxes[i].sizes[d]), []).append(i)
    return out


def _cuts(extents) -> list[int]:
    return sorted({x for e in extents for x in e})


def _slab_range(cuts: list[int], extent: tuple[int, int]) -> tuple[int, int]:
    from bisect import bisect_left
    return bisect_left(cuts, extent[0]), bisect_left(cuts, extent[1])


def _overlap(boxes, idx: list[int], dims: list[int]) -> tuple[int, int] | None:
    if len(idx) < 2:
        return None
    d = dims[0]
    if len(dims) == 1:
        order = sorted(idx, key=lambda i: (boxes[i].offsets[d], i))
        reach = order[0]          # the box ending furthest along d among those seen
        for i in order[1:]:
            if boxes[reach].intersect(boxes[i]) is not None:
                return min(reach, i), max(reach, i)
            if boxes[i].offsets[d] + boxes[i].sizes[d] > boxes[reach].offsets[d] + boxes[reach].sizes[d]:
                reach = i
        return None
    extents = _extents(boxes, idx, d)
    if len(extents) == 1:
        return _overlap(boxes, idx, dims[1:])       # one slab: nothing to cut on d
    cuts = _cuts(extents)
    slabs: dict[int, list[int]] = {}
    for e, members in extents.items():
        a, b = _slab_range(cuts, e)
        for s in range(a, b):
            slabs.setdefault(s, []).extend(members)
    for s in sorted(slabs):
        hit = _overlap(boxes, sorted(slabs[s]), dims[1:])
        if hit is not None:
            return hit
    return None
