"""The target writer's checksums: combined CRCs equal the CRC of the concatenation, and the crc32c a
rank file's resume mark records (combined from its records') equals the file's own."""
from __future__ import annotations

import os
import zlib

import google_crc32c
import torch

from ckptctl.reshard.resume import _crc_file
from ckptctl.reshard.stream import LazyTensor, save_streaming
from ckptctl.storage.crcs import CRC32, CRC32C, combine, crc32


def test_combine_equals_the_crc_of_the_concatenation():
    for na, nb in ((0, 5), (7, 0), (1000, 123457), (65536, 1)):
        a, b = os.urandom(na), os.urandom(nb)
        assert combine(zlib.crc32(a), zlib.crc32(b), nb, CRC32) == zlib.crc32(a + b)
        assert combine(google_crc32c.value(a), google_crc32c.value(b), nb, CRC32C) == google_crc32c.value(a + b)
    data = os.urandom(4099)
    assert crc32(data) == zlib.crc32(data)


def test_streamed_file_crc32c_without_reading_it_back(tmp_path):
    w = torch.randn(37, 11).to(torch.bfloat16)
    small = torch.arange(5)

    def fill(write):
        for r in range(0, 37, 8):
            write(w[r:r + 8])

    sums: dict = {}
    p = tmp_path / "m.pt"
    save_streaming({"model": {"w": LazyTensor(w.shape, w.dtype, fill), "s": small}, "x": 3}, p, sums)
    assert sums[str(p)] == _crc_file(p)
    back = torch.load(p, weights_only=False)
    assert torch.equal(back["model"]["w"].view(torch.uint8), w.view(torch.uint8))
