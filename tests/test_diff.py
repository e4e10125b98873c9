"""core.diff: the byte comparison behind verify, the optimizer gather and the replica check. Its fast path
(memcmp) must agree with an elementwise byte comparison written here independently."""
from __future__ import annotations

import pytest
import torch

from ckptctl.core.diff import byte_diff, same_bytes


def _expected(a: torch.Tensor, b: torch.Tensor):
    """Independent expectation: compare each element's bytes as Python bytes objects."""
    sa, sb = a.reshape(-1).contiguous(), b.reshape(-1).contiguous()
    ea = [bytes(sa[i:i + 1].view(torch.uint8).tolist()) for i in range(sa.numel())]
    eb = [bytes(sb[i:i + 1].view(torch.uint8).tolist()) for i in range(sb.numel())]
    bad = [i for i, (x, y) in enumerate(zip(ea, eb)) if x != y]
    return (len(bad), bad[0]) if bad else None


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32, torch.float64, torch.uint8, torch.int64])
def test_byte_diff_matches_an_elementwise_comparison(dtype):
    g = torch.Generator().manual_seed(3)
    a = (torch.rand(7, 9, generator=g) * 100).to(dtype)
    b = a.clone()
    assert same_bytes(a, b) and byte_diff(a, b) is None
    flat = b.reshape(-1)
    for i in (5, 40, 62):   # flip one bit of three elements' first byte
        flat[i:i + 1].view(torch.uint8)[0] ^= 1
    assert not same_bytes(a, b)
    assert byte_diff(a, b) == _expected(a, b) == (3, 5)


def test_bytes_not_values():
    """NaN equals itself bitwise and -0.0 differs from 0.0: bytes, never `==`."""
    a = torch.tensor([float("nan"), 0.0, 1.0])
    b = a.clone()
    assert byte_diff(a, b) is None
    b[1] = -0.0
    assert byte_diff(a, b) == (1, 1)


def test_views_shapes_and_dtypes():
    x = torch.arange(24, dtype=torch.float32).reshape(4, 6)
    y = x.t().contiguous().t()            # same values, other strides
    assert same_bytes(x[:, 1:4], y[:, 1:4]) and byte_diff(x[:, 1:4], y[:, 1:4]) is None
    assert not same_bytes(x, x.reshape(6, 4))                      # other shape
    assert not same_bytes(x, x.view(torch.int32))                   # other dtype, same bytes
    assert same_bytes(torch.empty(0, 3), torch.empty(0, 3))
