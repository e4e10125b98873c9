"""Checksums of the target phase: CRC-32 (the zip records' checksum) at the fastest available speed, and
combining checksums of consecutive byte ranges without reading the bytes again.

CRC-32: `isal.isal_zlib.crc32` (ISA-L, ~25 GB/s on one core here) when installed, else `zlib.crc32`
(~4 GB/s); both give the same value. `combine(crc_a, crc_b, len_b, poly)` is the CRC of A+B from the CRCs of
A and B (zlib's crc32_combine, `multmodp`/`x2nmodp`), for CRC-32 and for crc32c: a file's crc32c is the
combination of its pieces' crc32c, which the writer already has (a referenced chunk's crc32c is checked
when it is read), so the resume mark needs no second read of a file just written.
"""
from __future__ import annotations

from functools import lru_cache

try:   # optional: ISA-L's CRC-32 is ~6x zlib's
    from isal.isal_zlib import crc32
except ImportError:  # pragma: no cover - depends on the environment
    from zlib import crc32

CRC32 = 0xEDB88320    # reflected polynomials
CRC32C = 0x82F63B78

__all__ = ["crc32", "combine", "CRC32", "CRC32C"]


def _multmodp(a: int, b: int, poly: int) -> int:
    """a * b modulo the polynomial (reflected bit order)."""
    m, p = 1 << 31, 0
    while True:
        if a & m:
            p ^= b
            if not a & (m - 1):
                return p
        m >>= 1
        b = (b >> 1) ^ poly if b & 1 else b >> 1


@lru_cache(maxsize=None)
def _x2n_table(poly: int) -> tuple:
    p, out = 1 << 30, []    # x^1
    for _ in range(32):
        out.append(p)
        p = _multmodp(p, p, poly)
    return tuple(out)


def combine(crc_a: int, crc_b: int, len_b: int, poly: int = CRC32C) -> int:
    """The CRC of the bytes A followed by B, given crc(A), crc(B) and len(B)."""
    table, p, n, k = _x2n_table(poly), 1 << 31, len_b, 3   # x^(8 * len_b)
    while n:
        if n & 1:
            p = _multmodp(table[k & 31], p, poly)
        n >>= 1
        k += 1
    return _multmodp(p, crc_a, poly) ^ (crc_b & 0xFFFFFFFF)
