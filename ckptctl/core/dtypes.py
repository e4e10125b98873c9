"""Dtype naming and the store's chunk grid (pure: no storage library). The planner and the formats use these
to describe arrays; `ckptctl.store` uses them to lay the arrays out."""
from __future__ import annotations

from itertools import product
from math import gcd

from ckptctl.box import Box
from ckptctl.errors import BadInput

# torch dtype name -> (numpy storage dtype, name of the torch view dtype used to move bytes); names, not
# torch objects: the planner imports this module and must not import torch (~1 s, ~230 MiB)
BITVIEW = {
    "bfloat16": ("uint16", "uint16"),
    "float8_e4m3fn": ("uint8", "uint8"),
    "float8_e5m2": ("uint8", "uint8"),
}
NATIVE = {
    "float16": "float16", "float32": "float32", "float64": "float64", "int8": "int8", "int16": "int16",
    "int32": "int32", "int64": "int64", "uint8": "uint8", "bool": "bool",
}
_ITEMSIZE = {"uint8": 1, "int8": 1, "bool": 1, "uint16": 2, "int16": 2, "float16": 2, "int32": 4, "float32": 4,
             "int64": 8, "float64": 8}


def dtype_name(t) -> str:
    return str(t).removeprefix("torch.")


def torch_dtype(name: str):
    import torch   # here, not at the top: the planner imports this module without torch
    return getattr(torch, name)


def storage_dtype(name: str) -> str:
    """The dtype the store keeps a tensor dtype as (bf16 and fp8 as unsigned ints of their width: bytes kept)."""
    if name in BITVIEW:
        return BITVIEW[name][0]
    if name in NATIVE:
        return NATIVE[name]
    raise BadInput(f"unsupported tensor dtype {name}")


def itemsize(name: str) -> int:
    """Bytes per element of a tensor dtype name."""
    return _ITEMSIZE[storage_dtype(name)]


def chunk_shape(shape: tuple[int, ...], boxes: list[Box], itemsize: int, max_bytes: int = 64 << 20) -> tuple[int, ...]:
    """A chunk grid in which every chunk lies inside one writer's box (gcd of all box edges),
    then cut along dim 0 (by a divisor) until a chunk is at most `max_bytes`."""
    if not shape:
        return ()
    c = list(shape)
    for b in boxes:
        for d in range(len(shape)):
            c[d] = gcd(c[d], gcd(b.offsets[d], b.sizes[d]))
    c = [max(1, x) for x in c]
    rest = itemsize
    for x in c[1:]:
        rest *= x
    while c[0] > 1 and c[0] * rest > max_bytes:
        for div in range(2, c[0] + 1):
            if c[0] % div == 0:
                c[0] //= div
                break
    return tuple(c)


def chunk_grid(shape, chunks, offsets, sizes):
    """(chunk index, slices into the box, slices into the chunk, whether the box covers the chunk's
    part of the array) for every chunk the box touches."""
    ranges = []
    for n, c, o, s in zip(shape, chunks, offsets, sizes):
        ranges.append(range(o // c, (o + s - 1) // c + 1))
    for idx in product(*ranges):
        box_sl, chunk_sl, full = [], [], True
        for i, n, c, o, s in zip(idx, shape, chunks, offsets, sizes):
            c0, c1 = i * c, min(i * c + c, n)
            lo, hi = max(c0, o), min(c1, o + s)
            box_sl.append(slice(lo - o, hi - o))
            chunk_sl.append(slice(lo - c0, hi - c0))
            full = full and lo == c0 and hi == c1
        yield idx, (*box_sl, Ellipsis), (*chunk_sl, Ellipsis), full   # Ellipsis: 0-d gives views
