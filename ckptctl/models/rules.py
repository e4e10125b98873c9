"""The sharding rule vocabulary shared by every model family.

A family module maps each tensor name to a `Rule`; this module turns a rule into `Piece`s: which box
of a rank's local tensor is which box of which global array. The same pieces drive reading a source
(local -> store), writing a target (store -> local), verify's reference gather and the example
generator, so a rule is written once and used in both directions.
"""
from __future__ import annotations

from dataclasses import dataclass

from ckptctl.box import Box
from ckptctl.errors import BadInput

REPLICATED = "replicated"  # every rank holds the whole tensor
SPLIT = "split"            # dim `dim` cut evenly over the group
VOCAB = "vocab"            # dim 0 over the padded vocabulary; padding rows differ between layouts
SEGMENTS = "segments"      # local = concat over segments of each segment's per-rank slice (GLU, Mamba)


@dataclass(frozen=True)
class Rule:
    kind: str
    dim: int = 0
    group: str = "tp"                     # which parallel size splits it: "tp" or "etp"
    # SEGMENTS: (array suffix, global length along `dim`, or None = "equal share of what is left")
    segments: tuple[tuple[str, int | None], ...] = ()

    def n(self, tp: int, etp: int) -> int:
        if self.kind == REPLICATED:
            return 1
        return etp if self.group == "etp" else tp


@dataclass(frozen=True)
class Piece:
    """Local box `local` of a rank's tensor holds box `gbox` of store array `array`.

    With an expert axis the global box has one more (leading) dimension than the local one, of size 1.
    """

    local: Box
    array: str
    gbox: Box

    def to_json(self):
        return [self.local.to_json(), self.array, self.gbox.to_json()]

    @classmethod
    def from_json(cls, j):
        return cls(Box.from_json(j[0]), j[1], Box.from_json(j[2]))


def segment_lengths(rule: Rule, total: int) -> list[tuple[str, int]]:
    """Resolve `None` lengths: they share equally what the fixed ones leave of `total`."""
    fixed = sum(length for _, length in rule.segments if length is not None)
    free = [s for s, length in rule.segments if length is None]
    rest = total - fixed
    if free and rest % len(free):
        raise BadInput(f"segment lengths {rule.segments} do not fit a dimension of {total}")
    share = rest // len(free) if free else 0
    return [(s, share if length is None else length) for s, length in rule.segments]


def global_shapes(rule: Rule, base: str, local_shape: tuple[int, ...], n: int,
                  expert_count: int | None = None) -> dict[str, tuple[int, ...]]:
    """Global array shapes implied by one rank's local shape (source side)."""
    lead = (expert_count,) if expert_count is not None else ()
    if rule.kind == REPLICATED:
        return {base: lead + tuple(local_shape)}
    if rule.dim >= len(local_shape):
        raise BadInput(f"tensor {base!r} has shape {tuple(local_shape)}, cannot split dim {rule.dim}")
    g = list(local_shape)
    g[rule.dim] *= n
    if rule.kind in (SPLIT, VOCAB):
        return {base: lead + tuple(g)}
    out: dict[str, tuple[int, ...]] = {}
    for suffix, length in segment_lengths(rule, g[rule.dim]):
        shape = list(g)
        prev = out.get(base + suffix)
        shape[rule.dim] = length + (prev[len(lead) + rule.dim] if prev else 0)
        out[base + suffix] = lead + tuple(shape)
    return out


def pieces(rule: Rule, base: str, shapes: dict[str, tuple[int, ...]], n: int, r: int,
           expert: int | None = None, split_size: int | None = None) -> tuple[tuple[int, ...], list[Piece]]:
    """(local shape, pieces) of rank `r` of `n` for a tensor whose global arrays have `shapes`.

    `expert` selects one slot of a leading expert axis. `split_size` overrides the global length of a
    VOCAB dim (the target's padded vocab, which may differ from the store's rows; rows past the store
    are left out of the pieces and zero-filled by the writer).
    """
    lead = 1 if expert is not None else 0

    def gbox(array, offs, sizes):
        if expert is None:
            return Box(tuple(offs), tuple(sizes))
        return Box((expert,) + tuple(offs), (1,) + tuple(sizes))

    first = shapes[base] if base in shapes else next(iter(shapes.values()))
    if rule.kind == REPLICATED:
        shape = tuple(first[lead:])
        return shape, [Piece(Box.full(shape), base, gbox(base, [0] * len(shape), shape))]
    d = rule.dim
    if rule.kind in (SPLIT, VOCAB):
        g = list(first[lead:])
        total = split_size if (rule.kind == VOCAB and split_size) else g[d]
        if total % n:
            raise BadInput(f"tensor {base!r}: dimension {d} of size {total} is not divisible by {n}")
        local = list(g)
        local[d] = total // n
        offs = [0] * len(g)
        offs[d] = r * local[d]
        lbox = Box.full(local)
        if rule.kind == VOCAB:  # clip to the rows the store has
            have = Box.full(g)
            inter = Box(tuple(offs), tuple(local)).intersect(have)
            if inter is None:
                return tuple(local), []
            lb = Box(tuple(0 if i != d else inter.offsets[d] - offs[d] for i in range(len(g))), inter.sizes)
            return tuple(local), [Piece(lb, base, gbox(base, inter.offsets, inter.sizes))]
        return tuple(local), [Piece(lbox, base, gbox(base, offs, local))]
    # SEGMENTS: the local tensor concatenates each segment's r-th slice along dim d.
    segs = []
    starts: dict[str, int] = {}
    for suffix, length in rule.segments:
        segs.append((suffix, length))
    total = sum(shapes[base + s][lead + d] for s in dict.fromkeys(s for s, _ in segs))
    resolved = segment_lengths(rule, total)
    out, cursor = [], 0
    ref = None
    for suffix, length in resolved:
        arr = base + suffix
        ref = shapes[arr][lead:]
        if length % n:
            raise BadInput(f"tensor {base!r}: segment {suffix or '#'} of length {length} is not divisible by {n}")
        size = list(ref)
        size[d] = length // n
        loffs = [0] * len(ref)
        loffs[d] = cursor
        goffs = [0] * len(ref)
        goffs[d] = starts.get(arr, 0) + r * size[d]
        out.append(Piece(Box(tuple(loffs), tuple(size)), arr, gbox(arr, goffs, size)))
        starts[arr] = starts.get(arr, 0) + length
        cursor += size[d]
    local = list(ref)
    local[d] = cursor
    return tuple(local), out
