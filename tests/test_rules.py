"""Each GPT rule: split -> merge returns the same bytes, and the split matches a hand-written expectation."""
import pytest
import torch

from ckptctl.box import Box
from ckptctl.models.config import padded_vocab
from ckptctl.models.gpt import COL, GLU_ROWS, ROW, VOCAB_ROWS, R
from ckptctl.models.rules import global_shapes, pieces
from conftest import raw_bytes


def split(rule, g: torch.Tensor, n: int, split_size=None):
    shapes = {"a": tuple(g.shape)}
    out = []
    for r in range(n):
        shape, ps = pieces(rule, "a", shapes, n, r, split_size=split_size)
        local = torch.zeros(shape, dtype=g.dtype)
        for p in ps:
            local[p.local.slices] = g[p.gbox.slices]
        out.append(local)
    return out


def merge(rule, locals_, n: int) -> torch.Tensor:
    shapes = global_shapes(rule, "a", tuple(locals_[0].shape), n)
    g = torch.full(shapes["a"], float("nan"), dtype=locals_[0].dtype)
    for r, local in enumerate(locals_):
        _, ps = pieces(rule, "a", shapes, n, r)
        for p in ps:
            g[p.gbox.slices] = local[p.local.slices]
    return g


@pytest.mark.parametrize("rule,shape", [(COL, (24, 8)), (ROW, (8, 24)), (GLU_ROWS, (48, 8)), (R, (8,)),
                                        (COL, (24,)), (GLU_ROWS, (48,)), (VOCAB_ROWS, (32, 8))])
@pytest.mark.parametrize("n", [1, 2, 4])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_split_merge_round_trip(rule, shape, n, dtype):
    g = torch.randn(shape).to(dtype)
    back = merge(rule, split(rule, g, n), n)
    assert raw_bytes(back) == raw_bytes(g)


def test_glu_fc1_matches_megatron_layout():
    # Independent expectation: rank r holds [W_r; V_r] with W = first F rows, V = last F rows.
    F, H, n = 8, 3, 4
    g = torch.randn(2 * F, H)
    W, V = g[:F], g[F:]
    for r, local in enumerate(split(GLU_ROWS, g, n)):
        want = torch.cat([W.chunk(n)[r], V.chunk(n)[r]])
        assert raw_bytes(local) == raw_bytes(want)
    # and concatenating the local tensors is NOT the global tensor
    assert raw_bytes(torch.cat(split(GLU_ROWS, g, n))) != raw_bytes(g)


def test_qkv_plain_dim0_and_proj_dim1():
    g = torch.randn(12, 4)
    assert [raw_bytes(x) for x in split(COL, g, 3)] == [raw_bytes(x) for x in g.chunk(3, dim=0)]
    h = torch.randn(4, 12)
    assert [raw_bytes(x) for x in split(ROW, h, 3)] == [raw_bytes(x.contiguous()) for x in h.chunk(3, dim=1)]


def test_vocab_padding_rows_zero_filled_and_dropped():
    V, H = 127, 2
    vp1, vp4 = padded_vocab(V, 128, 1), padded_vocab(V, 128, 4)
    assert (vp1, vp4) == (128, 512)
    g = torch.randn(vp1, H)
    locals4 = split(VOCAB_ROWS, g, 4, split_size=vp4)
    full = torch.cat(locals4)
    assert full.shape == (512, H)
    assert raw_bytes(full[:128]) == raw_bytes(g)
    assert raw_bytes(full[128:]) == bytes(384 * H * 4)   # rows past the source are zero
    # back to TP1: the store holds 512 rows now; the target keeps 128 of them
    back = split(VOCAB_ROWS, full, 1, split_size=vp1)[0]
    assert raw_bytes(back) == raw_bytes(g)


def test_indivisible_split_is_an_error():
    from ckptctl.errors import BadInput
    with pytest.raises(BadInput, match="not divisible"):
        pieces(COL, "a", {"a": (10, 4)}, 4, 0)


def test_box_intersect():
    a, b = Box((0, 0), (4, 4)), Box((2, 3), (4, 4))
    assert a.intersect(b) == Box((2, 3), (2, 1))
    assert a.intersect(Box((4, 0), (1, 1))) is None
