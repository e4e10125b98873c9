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
        return cls(tuple(0 for _ in shape), tuple(int(s) for s in shape))

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
