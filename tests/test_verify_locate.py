"""verify names where a differing optimizer element lies (ckptctl/verify_locate_optim.py and the formats'
optim_locate.py): one element is flipped in a converted copy at a place the test finds by itself (state
entries, the weight's bytes inside the flat master buffer, the `.metadata` chunks), and `verify --json` must
name exactly that file, tensor and byte on the flipped side."""
from __future__ import annotations

import math
import shutil

import pytest
import torch

from conftest import flip_dist_chunk, load

LAYERS = ("--layers", "2")


def _example(cli, root, *args):
    r = cli("example", "gpt", "--out", root, *LAYERS, *args)
    assert r.code == 0, r.err
    return root


def _convert(cli, src, dst, *args):
    r = cli("convert", src, dst, "--nproc", "0", *args)
    assert r.code == 0, r.err
    return dst


def _one_optim_diff(cli, a, b) -> dict:
    r = cli("verify", a, b, "--json")
    assert r.code == 1, r.out
    got = [d for d in r.json()["differences"] if d["kind"] == "optimizer" and d["reason"] == "bytes differ"]
    assert len(got) == 1 and got[0]["count"] == 1, r.out
    return got[0]


def _flip_state(path, entry, flat: int):
    """Flip the low bit of element `flat` of the tensor `entry(sd)` in the rank file at `path`."""
    sd = load(path)
    entry(sd).view(-1).view(torch.int32)[flat] ^= 1
    torch.save(sd, path)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_legacy_adam_names_the_state_entry(cli, tmp_path, dtype):
    src = _example(cli, tmp_path / "s", "--layout", "tp1pp1", "--optimizer", "adam", "--dtype", dtype)
    a = _convert(cli, src, tmp_path / "a", "--to", "tp2pp1")
    b = tmp_path / "b"
    shutil.copytree(a, b)
    rank = b / "iter_0000010/mp_rank_01/model_optim_rng.pt"
    opt = load(rank)["optimizer"]
    if dtype == "float32":      # FP32Optimizer: exp_avg of the last 2-D state entry
        k = max(i for i, st in opt["state"].items() if st["exp_avg"].dim() == 2)
        t = opt["state"][k]["exp_avg"]
        entry = lambda sd: sd["optimizer"]["state"][k]["exp_avg"]   # noqa: E731
        name = f"optimizer.state[{k}].exp_avg"
    else:                       # Float16Optimizer: the fp32 master of the last 2-D half parameter of group 0
        i = max(j for j, m in enumerate(opt["fp32_from_fp16_params"][0]) if m.dim() == 2)
        t = opt["fp32_from_fp16_params"][0][i]
        entry = lambda sd: sd["optimizer"]["fp32_from_fp16_params"][0][i]   # noqa: E731
        name = f"optimizer.fp32_from_fp16_params[0][{i}]"
    cols = t.shape[1]
    flat = cols + 3                                     # element [1, 3]
    _flip_state(rank, entry, flat)
    d = _one_optim_diff(cli, a, b)
    assert d["key"].startswith("optim/exp_avg/" if dtype == "float32" else "optim/param/")
    for side, root in (("where_a", a), ("where_b", b)):
        w = d[side]
        assert w["file"] == str(root / "iter_0000010/mp_rank_01/model_optim_rng.pt")
        assert w["tensor"] == name and w["local_index"] == [1, 3] and w["byte_offset"] == 4 * flat


def _offset_of(flat: torch.Tensor, w: torch.Tensor) -> int:
    """Where the bytes of `w` sit inside the flat buffer (found by search, not by the layout rules)."""
    hay, needle = flat.view(torch.int32), w.reshape(-1).view(torch.int32)
    n = needle.numel()
    hits = [int(i) for i in (hay == needle[0]).nonzero().flatten()
            if int(i) + n <= hay.numel() and torch.equal(hay[int(i):int(i) + n], needle)]
    assert len(hits) == 1
    return hits[0]


def test_legacy_distributed_names_the_flat_buffer_offset(cli, tmp_path):
    src = _example(cli, tmp_path / "s", "--layout", "tp2pp1dp2")      # DP 2: the distributed optimizer
    a = _convert(cli, src, tmp_path / "a", "--to", "tp1pp1dp2")
    b = tmp_path / "b"
    shutil.copytree(a, b)
    key = "decoder.layers.1.mlp.linear_fc2.weight"
    w = load(b / "iter_0000010/mp_rank_00/model_optim_rng.pt")["model"][key]    # fp32: its own master
    f = b / "iter_0000010/mp_rank_00/distrib_optim.pt"
    st = load(f)
    e = st[0][(torch.float32, torch.float32)]
    off = _offset_of(e["param"], w)
    at = off + w.shape[1] + 3                               # element [1, 3] of the weight
    e["exp_avg"].view(torch.int32)[at] ^= 1
    torch.save(st, f)
    d = _one_optim_diff(cli, a, b)
    assert d["key"] == "optim/exp_avg/" + key and d["first_nd_index"] == [1, 3]
    for side, root in (("where_a", a), ("where_b", b)):
        wh = d[side]
        assert wh["file"] == str(root / "iter_0000010/mp_rank_00/distrib_optim.pt")
        assert wh["tensor"] == "[0][(torch.float32, torch.float32)][exp_avg]"
        assert wh["local_index"] == [at] and wh["byte_offset"] == 4 * at and wh["param_offset"] == off


def _flip_chunk(root, out, key: str, j: int) -> list:
    """Copy torch_dist `root` to `out` and flip the low bit of element `j` of the LAST `.metadata` chunk of
    `key` (a bucket's last chunk is a parameter slice: alignment gaps are under 64 elements and come before
    a parameter; a stacked key's last chunk is its last layer), in place in its .distcp blob."""
    chunk = flip_dist_chunk(root, out, key, j, chunk=-1, whole=True)
    sizes = chunk[1]
    assert j < math.prod(sizes) and (len(sizes) > 1 or sizes[0] >= 64)
    return chunk


@pytest.mark.parametrize("optimizer,key", [
    ("distributed", "optimizer.distributed.dp_group_idx_1.gbuf_idx_0.dtype_(torch.float32, torch.float32)"
                    ".bucket_idx_0.exp_avg_sq"),
    ("adam", "optimizer.state.exp_avg.decoder.layers.mlp.linear_fc1.weight"),
])
def test_torch_dist_names_the_chunk(cli, tmp_path, optimizer, key):
    layout = "tp2pp1dp2" if optimizer == "distributed" else "tp1pp1"
    src = _example(cli, tmp_path / "s", "--layout", layout, "--optimizer", optimizer)
    a = _convert(cli, src, tmp_path / "a", "--to", layout.replace("tp1", "tp2"), "--to-format", "torch_dist")
    b = tmp_path / "b"
    j = 70
    off, sizes, fname, blob, _ = _flip_chunk(a, b, key, j)
    assert any(off)                         # not the buffer's / array's first element
    local, rest = [], j
    for n in reversed(sizes):
        local.insert(0, rest % n)
        rest //= n
    d = _one_optim_diff(cli, a, b)
    for side, root in (("where_a", a), ("where_b", b)):
        w = d[side]
        assert w["file"] == str(root / "iter_0000010" / fname) and w["tensor"] == key
        assert w["chunk_offsets"] == list(off) and w["blob_offset"] == blob
        assert w["local_index"] == local and w["byte_offset"] == 4 * j
