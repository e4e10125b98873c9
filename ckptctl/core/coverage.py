"""The one coverage rule: the boxes that write a global array must lie inside it, be pairwise disjoint and
together cover it (exactly one owner per element), checked before anything is written (DCP's
`_validate_global_plan`, megatron-core's `validate_sharding_integrity`). Pure: returns the problems."""
from __future__ import annotations

from math import prod

from ckptctl.box import Box, find_overlap


def coverage_problems(shape: tuple[int, ...], boxes: list[Box], disjoint: bool = False) -> list[str]:
    """What is wrong with `boxes` as a tiling of an array of `shape` (empty: each element has one owner).
    `disjoint`: the caller has already run find_overlap on these boxes (it names the files): not again."""
    out = []
    for b in boxes:
        if len(b.offsets) != len(shape) or any(o < 0 or o + s > n for o, s, n in zip(b.offsets, b.sizes, shape)):
            out.append(f"box at {list(b.offsets)} of size {list(b.sizes)} lies outside {list(shape)}")
    hit = None if disjoint else find_overlap(boxes)
    if hit is not None:
        out.append(f"box at {list(boxes[hit[1]].offsets)} overlaps the one at {list(boxes[hit[0]].offsets)}")
    got, vol = sum(b.volume for b in boxes), prod(shape)
    if not out and got != vol:
        out.append(f"cover {got} of its {vol} elements")
    return out


def missing(got: int, need: int) -> str | None:
    """A reader's check that the regions it assembled cover what it needs."""
    return None if got == need else f"cover {got} of the {need} elements"
