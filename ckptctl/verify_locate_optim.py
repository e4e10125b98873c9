"""verify's locations of optimizer differences: the file and place holding the first differing element of an
`optim/<comp>/<array>` tensor on one side.

Format-free part: the rank plan of the side's optimizer gather (`Format.optim_gather`) that holds the
element (the owner first, as the gather takes it), the element in that parameter's local tensor and, for
the distributed optimizer, the parameter's flat buffer and offset from `Context.layout_of` (the one layout
computation convert and the gather decode with). Where that is in the format's files: `Format.optim_locate`.
"""
from __future__ import annotations

from dataclasses import dataclass

from ckptctl.optstate.params import OPTIM, Param


@dataclass(frozen=True)
class Held:
    """A rank plan of the gather holding one element of a parameter's optimizer state."""

    fi: int                         # index into gather.files
    param: Param
    local: list[int]                # the element in the parameter's local tensor (the weight's local shape)
    flat: int                       # its flat index there
    buffer: tuple | None = None     # distributed optimizer: (sub-optimizer, gbuf index, Buffer, param offset)


def element_of(piece, index: list[int]) -> list[int] | None:
    """The local index of global element `index` in `piece`, or None when the piece does not hold it. Leading
    global axes the local tensor lacks (a stacked axis) only select the piece."""
    if len(index) != len(piece.gbox.sizes):
        return None
    if not all(o <= i < o + s for i, o, s in zip(index, piece.gbox.offsets, piece.gbox.sizes)):
        return None
    lead = len(piece.gbox.sizes) - len(piece.local.sizes)
    return [lo + i - g for lo, i, g in zip(piece.local.offsets, index[lead:], piece.gbox.offsets[lead:])]


def flat_of(local: list[int], shape) -> int:
    flat = 0
    for i, s in zip(local, shape):
        flat = flat * s + i
    return flat


def split_key(key: str) -> tuple[str, str] | None:
    """optim/<comp>/<name> -> (model array, comp); None for any other key."""
    if not key.startswith(OPTIM):
        return None
    comp, _, name = key[len(OPTIM):].partition("/")
    return ("model/" + name, comp) if name else None


def holder(gather, array: str, index: list[int]) -> Held | None:
    for fi, idx, piece, owned in sorted(gather.by_array.get(array, ()), key=lambda e: not e[3]):
        local = element_of(piece, index)
        if local is None:
            continue
        fp = gather.files[fi]
        params = gather.ctx.params(fp)
        param = next(p for p in params if p.index == idx)
        flat = flat_of(local, param.shape)
        return Held(fi, param, local, flat, _buffer_of(gather, fp, params, param))
    return None


def _buffer_of(gather, fp, params, param) -> tuple | None:
    if gather.info["kind"] != "distributed":
        return None
    _, bufs = gather.ctx.layout_of(fp, params)
    for s, sub in enumerate(bufs):
        for g, buf in enumerate(sub):
            for p, off in zip(buf.params, buf.offsets):
                if p.index == param.index:
                    return s, g, buf, off
    return None


class Locator:
    """One side of verify: optimizer differences located in its files (the gather built on first use)."""

    def __init__(self, src):
        self.src, self._gather, self.memo = src, None, {}

    def __call__(self, key: str, index: list[int] | None) -> dict | None:
        what = split_key(key)
        if what is None or index is None or self.src.optim is None:
            return None
        if self._gather is None:
            self._gather = self.src.format.optim_gather(self.src)
        held = holder(self._gather, what[0], index)
        if held is None:
            return None
        return self.src.format.optim_locate(self.src, self._gather, what[0], what[1], index, held, self.memo)
