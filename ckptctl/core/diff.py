"""Byte comparison and the difference record every comparison reports (verify's weights, the optimizer
gather, the master/weight invariant). Pure: raw bytes only, never `==` on floats or `allclose`."""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Difference:
    key: str
    reason: str
    dtype_a: str | None = None
    dtype_b: str | None = None
    shape_a: list | None = None
    shape_b: list | None = None
    count: int = 0
    first_index: int | None = None
    first_nd_index: list | None = None
    a_hex: str | None = None
    b_hex: str | None = None
    where: str | None = None


def _bytes(t: torch.Tensor) -> torch.Tensor:
    t = t.contiguous()
    return t.reshape(-1).view(torch.uint8).reshape(t.numel(), t.element_size()) if t.numel() else t.view(torch.uint8)


_INT_VIEW = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def byte_diff(a: torch.Tensor, b: torch.Tensor) -> tuple[int, int] | None:
    """(differing element count, first differing flat index), comparing raw bytes; None if equal."""
    if a.numel() == 0:
        return None
    iv = _INT_VIEW.get(a.element_size())
    if iv is not None and a.dtype != torch.bool:   # same-width integer view: bits compared, one bool per element
        neq = (a.contiguous().view(iv) != b.contiguous().view(iv)).reshape(-1)
    else:
        neq = (_bytes(a) != _bytes(b)).any(dim=1)
    count = int(neq.sum())
    if count == 0:
        return None
    return count, int(neq.nonzero()[0, 0])


def _hex(t: torch.Tensor, flat: int) -> str:
    return _bytes(t.reshape(-1)[flat:flat + 1]).flatten().flip(0).numpy().tobytes().hex()


def _nd(shape, flat: int) -> list[int]:
    idx = []
    for s in reversed(shape):
        idx.append(flat % s)
        flat //= s
    return list(reversed(idx))


def _flat(idx, shape) -> int:
    f = 0
    for i, s in zip(idx, shape):
        f = f * s + i
    return f

