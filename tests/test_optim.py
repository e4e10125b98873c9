"""Optimizer state (DESIGN §6): the flat DistOpt layout, decode/encode, convert + verify end to end,
vocab padding rows, training-state policy, the moment-copy check and refusals."""
from __future__ import annotations

import json

import pytest
import torch

from ckptctl.formats.legacy.optim_codec import DIST_FILE
from ckptctl.optstate.buffers import buffer_layout, saved_offsets
from tests.conftest import load, raw_bytes


# --- the flat buffer layout -------------------------------------------------------------------

def test_layout_hand_computed():
    # Reverse order, 64-aligned starts, one bucket: p2 [0,64), p1 [64,74), p0 [128,228).
    offs, n = saved_offsets([100, 10, 64], [False] * 3, None, dp=2)
    assert offs == [128, 64, 0] and n == 228


def test_layout_shared_embedding_and_buckets_hand_computed():
    # p0 shared (embedding, first stage): the bucket before it closes at its aligned start.
    # reverse: p2 [0,70) p1 [128,138) -> bucket 0 closes at 192 (aligned start of p0), unpadded 192,
    # padded to lcm(2,128)=128 -> 256; p0 [256, 256+50) own bucket, unpadded 50.
    where, buckets = buffer_layout([50, 10, 70], [True, False, False], None, dp=2)
    assert where == [(256, 306, 1), (128, 138, 0), (0, 70, 0)]
    assert buckets == [(0, 256, 192), (256, 384, 50)]
    offs, n = saved_offsets([50, 10, 70], [True, False, False], None, dp=2)
    assert offs == [192, 128, 0] and n == 242
    # bucket_size 100: p2 [0,70) p1 [128,138) closes (138 >= 100) -> padded 256 (dp 3: lcm 384)
    where, buckets = buffer_layout([50, 10, 70], [False] * 3, 100, dp=3)
    assert buckets == [(0, 384, 138), (384, 768, 50)] and where[0] == (384, 434, 1)


@pytest.mark.mcore
def test_layout_matches_megatron_core():
    """megatron-core 0.19.2's own `_compute_per_buffer_param_layout` on stand-in params."""
    from types import SimpleNamespace

    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    class P:
        def __init__(self, n, shared):
            self.data = torch.empty(n)
            if shared:
                self.shared_embedding = True

    cases = [([100, 10, 64], [False] * 3, None, 2), ([50, 10, 70], [True, False, False], None, 2),
             ([50, 10, 70, 3, 999], [False] * 5, 100, 3), ([7, 300, 5, 64, 1], [False, False, False, False, True], 128, 8),
             ([4096, 64, 64, 4096, 512], [True] + [False] * 4, 5000, 4)]
    for numels, shared, bs, dp in cases:
        for high in (False, True):
            ps = [P(n, s) for n, s in zip(numels, shared)]
            lay = DistributedOptimizer._compute_per_buffer_param_layout(
                ps, bs, dp, SimpleNamespace(pad_buckets_for_high_nccl_busbw=high))
            where, buckets = buffer_layout(numels, shared, bs, dp, high)
            assert where == [lay.param_index_map[p] for p in ps]
            assert [(s, e) for s, e, _ in buckets] == lay.bucket_indices
            assert [u for _, _, u in buckets] == lay.per_bucket_numel_unpadded


# --- end to end -------------------------------------------------------------------------------

def _example(cli, tmp_path, name, *args):
    r = cli("example", "gpt", "--out", tmp_path / name, *args)
    assert r.code == 0, r.err
    return tmp_path / name


def _dist_files(root):
    return sorted(root.rglob(DIST_FILE))


def test_distributed_tp_dp_change_and_back(cli, tmp_path):
    s = _example(cli, tmp_path, "s", "--layout", "tp2pp1dp2", "--vocab", "130")
    assert len(_dist_files(s)) == 2
    r = cli("convert", s, tmp_path / "d", "--to", "tp1pp2dp4", "--json", "--nproc", "2")
    assert r.code == 0, r.err
    pol = r.json()["policies"]
    assert pol["optimizer"].startswith("converted: distributed optimizer")
    for k in ("iteration", "opt_param_scheduler", "rng_state", "args", "consumed samples", "distrib_optim.pt"):
        assert k in pol
    d = tmp_path / "d"
    assert len(_dist_files(d)) == 2
    v = cli("verify", s, d, "--json")
    assert v.code == 0, v.out
    keys = [row["key"] for row in v.json()["table"]]
    for c in ("param", "exp_avg", "exp_avg_sq"):
        assert f"optim/{c}/decoder.layers.3.mlp.linear_fc1.weight" in keys
    # back to the source layout: every optimizer file byte-equal in content
    r = cli("convert", d, tmp_path / "b", "--to", "tp2pp1dp2", "--nproc", "0")
    assert r.code == 0, r.err
    for fa, fb in zip(_dist_files(s), _dist_files(tmp_path / "b")):
        a, b = load(fa), load(fb)
        for k in ("param", "exp_avg", "exp_avg_sq"):
            ea, eb = a[0][(torch.float32, torch.float32)], b[0][(torch.float32, torch.float32)]
            assert raw_bytes(ea[k]) == raw_bytes(eb[k])
        assert a[0][(torch.float32, torch.float32)]["numel_unpadded"] == b[0][(torch.float32, torch.float32)]["numel_unpadded"]
    ma = load(sorted(s.rglob("model_optim_rng.pt"))[0])["optimizer"]
    mb = load(sorted((tmp_path / "b").rglob("model_optim_rng.pt"))[0])["optimizer"]
    assert repr(ma) == repr(mb)


def test_distributed_file_structure_independent(cli, tmp_path):
    """An independently written decode of one parameter from the example's flat buffer."""
    s = _example(cli, tmp_path, "s", "--layout", "tp1pp1dp2", "--layers", "2")
    f = load(_dist_files(s)[0])
    assert f["buckets_coalesced"] is True
    e = f[0][(torch.float32, torch.float32)]
    model = load(sorted(s.rglob("model_optim_rng.pt"))[0])["model"]
    params = [(k, v) for k, v in model.items() if torch.is_tensor(v)]
    # the last param (output_layer.weight) comes first in the buffer, at 0; the one before starts
    # at its numel rounded up to 64.
    (k_last, w_last), (k_prev, w_prev) = params[-1], params[-2]
    assert k_last == "output_layer.weight"
    n = w_last.numel()
    assert raw_bytes(e["param"][:n].view(w_last.shape)) == raw_bytes(w_last)   # fp32: master == weight
    start = -(-n // 64) * 64
    assert raw_bytes(e["param"][start:start + w_prev.numel()].view(w_prev.shape)) == raw_bytes(w_prev)
    assert not bool((e["exp_avg"] == 0).all()) and raw_bytes(e["exp_avg"]) != raw_bytes(e["exp_avg_sq"])
    assert e["numel_unpadded"] == e["param"].numel()
    opt = load(sorted(s.rglob("model_optim_rng.pt"))[0])["optimizer"]
    assert set(opt) == {"optimizer"} and [g["wd_mult"] for g in opt["optimizer"]["param_groups"]] == [1.0, 0.0]
    assert all(g["step"] == 10.0 and "params" not in g for g in opt["optimizer"]["param_groups"])


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_adam_reshard_and_index_order(cli, tmp_path, dtype):
    s = _example(cli, tmp_path, "s", "--layout", "tp2pp2", "--optimizer", "adam", "--dtype", dtype, "--tied")
    assert not _dist_files(s)
    r = cli("convert", s, tmp_path / "d", "--to", "tp1pp4", "--nproc", "0")
    assert r.code == 0, r.err
    v = cli("verify", s, tmp_path / "d", "--json")
    assert v.code == 0, v.out
    # independent check of the index order in one target file: torch numbers params group by group
    # (wd_mult 1 group first), each group in model order.
    f = sorted((tmp_path / "d").rglob("model_optim_rng.pt"))[-1]     # last stage: holds the tied copy
    sd = load(f)
    opt = sd["optimizer"] if dtype == "float32" else sd["optimizer"]["optimizer"]
    params = [(k, t) for k, t in sd["model"].items() if torch.is_tensor(t)]
    wd0 = [k for k, t in params if t.dim() == 1 or k.endswith(".bias")]
    order = [k for k, _ in params if k not in wd0] + wd0
    assert [len(g["params"]) for g in opt["param_groups"]] == [len(order) - len(wd0), len(wd0)]
    assert sum(opt["param_groups"][0]["params"] + opt["param_groups"][1]["params"]) == sum(range(len(order)))
    shapes = dict(params)
    for i, k in enumerate(order):
        assert opt["state"][i]["exp_avg"].shape == shapes[k].shape
        assert float(opt["state"][i]["step"]) == 10.0
    assert "output_layer.weight" in shapes
    if dtype == "bfloat16":
        masters = sd["optimizer"]["fp32_from_fp16_params"]
        assert [len(m) for m in masters] == [len(g["params"]) for g in opt["param_groups"]]


def test_vocab_padding_rows_follow_weights(cli, tmp_path):
    """V=130: TP1 pads to 256 rows, TP4 to 512; added rows are zero in weights and state, and the
    round trip drops them again bit for bit."""
    s = _example(cli, tmp_path, "s", "--layout", "tp1pp1dp2", "--vocab", "130")
    assert cli("convert", s, tmp_path / "d", "--to", "tp4pp1dp1", "--nproc", "0").code == 0
    last = load(sorted((tmp_path / "d").rglob(DIST_FILE))[-1])[0][(torch.float32, torch.float32)]
    sd = load(sorted((tmp_path / "d").rglob("model_optim_rng.pt"))[-1])
    emb = sd["model"]["embedding.word_embeddings.weight"]            # rows 384..512 of 512: all added
    assert emb.shape[0] == 128 and not bool(emb.any())
    # the embedding is the first model param, so it sits last in the buffer
    n = emb.numel()
    seg = last["exp_avg"][last["numel_unpadded"] - n:]
    assert seg.numel() == n and not bool(seg.any())
    v = cli("verify", s, tmp_path / "d", "--json")
    assert v.code == 0 and any("vocab padding" in a["reason"] for a in v.json()["allowed"])
    assert cli("convert", tmp_path / "d", tmp_path / "b", "--to", "tp1pp1dp2", "--nproc", "0").code == 0
    a = load(_dist_files(s)[0])[0][(torch.float32, torch.float32)]
    b = load(_dist_files(tmp_path / "b")[0])[0][(torch.float32, torch.float32)]
    assert all(raw_bytes(a[k]) == raw_bytes(b[k]) for k in ("param", "exp_avg", "exp_avg_sq"))


def test_verify_flags_copied_moment(cli, tmp_path):
    s = _example(cli, tmp_path, "s", "--layout", "tp1pp1dp2", "--layers", "2")
    f = _dist_files(s)[0]
    st = load(f)
    e = st[0][(torch.float32, torch.float32)]
    e["exp_avg_sq"] = e["exp_avg"].clone()              # the bug class: one moment written twice
    torch.save(st, f)
    v = cli("verify", s, s, "--json")
    assert v.code == 1
    reasons = [d["reason"] for d in v.json()["differences"]]
    assert any("byte-identical to exp_avg" in r for r in reasons), reasons
    e["exp_avg"] = e["param"].clone()
    e["exp_avg_sq"] = torch.rand_like(e["param"])
    torch.save(st, f)
    v = cli("verify", s, s, "--json")
    assert any("byte-identical to param" in d["reason"] for d in v.json()["differences"])


def test_verify_detects_flipped_state_bit(cli, tmp_path):
    s = _example(cli, tmp_path, "s", "--layout", "tp2pp1dp2")
    assert cli("convert", s, tmp_path / "d", "--to", "tp1pp1dp2", "--nproc", "0").code == 0
    f = _dist_files(tmp_path / "d")[0]
    st = load(f)
    e = st[0][(torch.float32, torch.float32)]
    e["exp_avg_sq"].view(torch.int32)[5] ^= 1
    torch.save(st, f)
    v = cli("verify", s, tmp_path / "d", "--json")
    assert v.code == 1
    assert [d["key"] for d in v.json()["differences"]] == ["optim/exp_avg_sq/output_layer.weight"]


def test_no_optimizer_and_none(cli, tmp_path):
    s = _example(cli, tmp_path, "s", "--layout", "tp2pp1dp2")
    r = cli("convert", s, tmp_path / "d", "--to", "tp1pp1", "--nproc", "0", "--no-optimizer", "--json")
    assert r.code == 0 and r.json()["policies"]["optimizer"] == "dropped (--no-optimizer)"
    assert not _dist_files(tmp_path / "d")
    assert all("optimizer" not in load(f) for f in (tmp_path / "d").rglob("model_optim_rng.pt"))
    n = _example(cli, tmp_path, "n", "--layout", "tp1pp1", "--optimizer", "none")
    assert all("optimizer" not in load(f) for f in n.rglob("model_optim_rng.pt"))
    assert cli("example", "gpt", "--out", tmp_path / "x", "--optimizer", "sgd").code == 2


def test_refusals(cli, tmp_path):
    s = _example(cli, tmp_path, "s", "--layout", "tp1pp1dp2", "--layers", "2")
    f = _dist_files(s)[0]
    st = load(f)
    old = dict(st)
    del st["buckets_coalesced"]
    torch.save(st, f)
    r = cli("convert", s, tmp_path / "d", "--to", "tp2pp1", "--nproc", "0")
    assert r.code in (2, 3) and "coalesced" in r.err and not (tmp_path / "d").exists()
    st = old
    st[0][(torch.float32, torch.float32)]["numel_unpadded"] += 64
    torch.save(st, f)
    r = cli("convert", s, tmp_path / "d", "--to", "tp2pp1", "--nproc", "0")
    assert r.code in (2, 3) and "numel_unpadded" in r.err and not (tmp_path / "d").exists()
    f.unlink()
    r = cli("convert", s, tmp_path / "d", "--to", "tp2pp1", "--nproc", "0")
    assert r.code == 2 and "distrib_optim.pt" in r.err
    a = _example(cli, tmp_path, "a", "--layout", "tp1pp1", "--optimizer", "adam", "--layers", "2")
    m = sorted(a.rglob("model_optim_rng.pt"))[0]
    sd = load(m)
    sd["optimizer"]["param_groups"][0]["params"].pop()
    torch.save(sd, m)
    r = cli("convert", a, tmp_path / "e", "--to", "tp2pp1", "--nproc", "0")
    assert r.code in (2, 3) and "param group" in r.err
