"""Byte comparison and the difference record every comparison reports (verify's weights, the optimizer
gather, the master/weight invariant). Pure: raw bytes only, never `==` on floats or `allclose`."""
from __future__ import annotations

import ctypes
import ctypes.util
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


def _libc_memcmp():
    try:
        f = ctypes.CDLL(ctypes.util.find_library("c") or None).memcmp
    except (OSError, AttributeError):  # pragma: no cover - no C library to call (not Linux/macOS)
        return None
    f.restype, f.argtypes = ctypes.c_int, [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t]
    return f


# libc's memcmp through ctypes (which releases the GIL): ~6 GB/s per side on one core, where an elementwise
# `!=` plus a sum is ~0.3 GB/s (it writes a bool per element and reads it again); equal regions are the
# common case in verify, so they are answered by memcmp and only a difference pays for the elementwise pass.
_MEMCMP = _libc_memcmp()


def same_bytes(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Do two tensors of one shape and dtype hold the same bytes? (Not `==`: NaN payloads, -0.0 count.)"""
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    a, b = a.contiguous(), b.contiguous()
    n = a.numel() * a.element_size()
    if n == 0:
        return True
    if _MEMCMP is not None:
        return _MEMCMP(a.data_ptr(), b.data_ptr(), n) == 0
    return bool(torch.equal(a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8)))  # pragma: no cover


def byte_diff(a: torch.Tensor, b: torch.Tensor) -> tuple[int, int] | None:
    """(differing element count, first differing flat index), comparing raw bytes; None if equal."""
    if a.numel() == 0 or same_bytes(a, b):
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

