"""Optimizer state across a change in the number of sub-optimizers (DESIGN §6.1): megatron-core puts
expert params in their own sub-optimizer only with EP>1 or ETP!=TP, so EP1 <-> EP2 splits or merges
the `optimizer` entry and `distrib_optim.pt` lists. Round trips, a hand-built expectation of the
per-sub-optimizer flat buffers, verify on a corrupted expert moment, and the merge refusals."""
from __future__ import annotations

import re
import shutil

import pytest
import torch

from ckptctl.errors import BadInput
from ckptctl.formats.legacy.optim_codec import DIST_FILE
from ckptctl.optstate.subopt import canon, merge_subs
from tests.conftest import load, raw_bytes, rank_files, run_cli

TINY = ("--layers", "1", "--hidden", "16", "--heads", "2", "--ffn", "32", "--moe-ffn", "8", "--experts", "4",
        "--vocab", "32")
F32 = (torch.float32, torch.float32)


def _example(cli, root, layout, kind):
    r = cli("example", "moe", "--out", root, "--layout", layout, "--optimizer", kind, *TINY)
    assert r.code == 0, r.err
    return root


def _convert(cli, a, b, layout):
    r = cli("convert", a, b, "--to", layout, "--nproc", "0", "--json")
    assert r.code == 0, r.err
    return r.json()


def _files(root, name):
    return {p.parent.name: load(p) for p in sorted(root.rglob(name))}


@pytest.fixture(scope="module")
def split(tmp_path_factory):
    """Distributed optimizer at tp1pp1dp2 (one sub-optimizer) and converted to tp1pp1ep2dp4 (EDP 2)."""
    root = tmp_path_factory.mktemp("split")
    s = _example(run_cli, root / "s", "tp1pp1dp2", "distributed")
    return s, root / "d", _convert(run_cli, s, root / "d", "tp1pp1ep2dp4")


@pytest.mark.parametrize("kind", ["distributed", "adam"])
def test_ep1_ep2_ep1_round_trip(cli, tmp_path, split, kind):
    """1 -> 2 -> 1 sub-optimizers: verify equal at EP2, every optimizer byte back at EP1."""
    if kind == "distributed":
        s, d, rep = split
        src = "tp1pp1dp2"
    else:
        src = "tp1pp1"
        s, d = _example(cli, tmp_path / "s", src, kind), tmp_path / "d"
        rep = _convert(cli, s, d, "tp1pp1ep2")
    assert "sub-optimizers 1 -> 2" in rep["policies"]["optimizer"]
    v = cli("verify", s, d, "--json")
    assert v.code == 0, v.out
    keys = {row["key"] for row in v.json()["table"]}
    assert any("experts" in k and k.startswith("optim/exp_avg_sq/") for k in keys), keys
    for sd in _files(d, "model_optim_rng.pt").values():   # two sub-optimizers everywhere
        assert isinstance(sd["optimizer"], list) and len(sd["optimizer"]) == 2
    rep = _convert(cli, d, tmp_path / "b", src)
    assert "sub-optimizers 2 -> 1" in rep["policies"]["optimizer"]
    for name in ("model_optim_rng.pt", DIST_FILE):
        a, b = _files(s, name), _files(tmp_path / "b", name)
        assert sorted(a) == sorted(b)
        for d in a:
            oa, ob = (a[d], b[d]) if name == DIST_FILE else (a[d]["optimizer"], b[d]["optimizer"])
            assert canon(oa) == canon(ob), (name, d)     # tensors by raw bytes
    assert cli("verify", s, tmp_path / "b").code == 0


def _hand_flat(params: list[tuple[str, int]]) -> tuple[dict[str, int], int]:
    """Independent DistOpt layout for one bucket: last param first, starts rounded up to 64."""
    off, at = {}, 0
    for k, n in reversed(params):
        at = -(-at // 64) * 64
        off[k] = at
        at += n
    return off, at


def test_split_expected_buffers_by_hand(split):
    """EP1 (one sub-optimizer, experts in the dense buffer) -> EP2 DP4 (EDP 2): distrib_optim.pt is
    [dense, expert] in EP rank 0's directory and [None, expert] in EP rank 1's (its writer, global
    rank 1, is expert-DP rank 0 but dense DP rank 1); every flat buffer built here by hand from the
    source buffer."""
    s, d, _ = split
    (sdir, ssd), = _files(s, "model_optim_rng.pt").items()
    src_params = [(k, t.numel()) for k, t in ssd["model"].items() if torch.is_tensor(t)]
    soff, sn = _hand_flat(src_params)
    sbuf = _files(s, DIST_FILE)[sdir][0][F32]
    assert sbuf["numel_unpadded"] == sn
    shapes = {k: t.shape for k, t in ssd["model"].items() if torch.is_tensor(t)}
    local = 2                                   # 4 experts over EP 2
    tfiles = _files(d, "model_optim_rng.pt")
    tdist = _files(d, DIST_FILE)
    assert sorted(tfiles) == ["mp_rank_00_000", "mp_rank_00_001"] == sorted(tdist)
    for dn, sd in tfiles.items():
        ep = int(dn.rsplit("_", 1)[1])
        tparams = [(k, t.numel()) for k, t in sd["model"].items() if torch.is_tensor(t)]

        def global_key(k):   # local expert j of EP rank ep is global expert ep * local + j
            return re.sub(r"local_experts\.(\d+)\.", lambda m: f"local_experts.{ep * local + int(m[1])}.", k)
        for sub, mine in ((0, [p for p in tparams if "experts" not in p[0]]),
                          (1, [p for p in tparams if "experts" in p[0]])):
            if sub == 0 and ep == 1:   # written by global rank 1: expert-DP rank 0, dense DP rank 1
                assert tdist[dn][0] is None
                continue
            toff, tn = _hand_flat(mine)
            got = tdist[dn][sub][0][F32]
            assert got["numel_unpadded"] == tn and set(tdist[dn][sub]) == {"buckets_coalesced", 0}
            for c in ("param", "exp_avg", "exp_avg_sq"):
                want = torch.zeros(tn)
                for k, n in mine:
                    g = global_key(k)
                    assert shapes[g].numel() == n
                    want[toff[k]:toff[k] + n] = sbuf[c][soff[g]:soff[g] + n]
                assert raw_bytes(got[c]) == raw_bytes(want), (dn, sub, c)
        groups = [[(g["wd_mult"], g["is_expert_parallel"], g["step"]) for g in o["optimizer"]["param_groups"]]
                  for o in sd["optimizer"]]
        assert groups == [[(1.0, False, 10.0), (0.0, False, 10.0)], [(1.0, True, 10.0)]]   # no expert biases


def test_verify_catches_corrupted_expert_moment_and_group(cli, tmp_path, split):
    s, d, _ = split
    shutil.copytree(d, tmp_path / "d")
    f = sorted((tmp_path / "d").rglob(DIST_FILE))[1]
    st = load(f)
    st[1][0][F32]["exp_avg"].view(torch.int32)[3] ^= 1      # the expert sub-optimizer of EP rank 1
    torch.save(st, f)
    v = cli("verify", s, tmp_path / "d", "--json")
    assert v.code == 1
    keys = [d["key"] for d in v.json()["differences"]]
    assert len(keys) == 1 and keys[0].startswith("optim/exp_avg/") and "experts" in keys[0], keys
    # an expert param group whose lr differs from the source's (same sub-optimizer count or not)
    m = sorted((tmp_path / "d").rglob("model_optim_rng.pt"))[0]
    sd = load(m)
    sd["optimizer"][1]["optimizer"]["param_groups"][0]["lr"] *= 2
    torch.save(sd, m)
    v = cli("verify", s, tmp_path / "d", "--json")
    assert "optimizer.param_groups" in [d["key"] for d in v.json()["differences"]]


def test_merge_refused_when_sub_optimizers_disagree(cli, tmp_path):
    """EP2 -> EP1 merges the expert groups into the dense ones: refused (exit 2, nothing written)
    when the expert sub-optimizer's step differs; EP2 -> EP2 layouts still convert."""
    s = _example(cli, tmp_path / "s", "tp1pp1ep2", "distributed")
    for m in rank_files(s):
        sd = load(m)
        for g in sd["optimizer"][1]["optimizer"]["param_groups"]:
            g["step"] = 9.0
        torch.save(sd, m)
    r = cli("convert", s, tmp_path / "d", "--to", "tp1pp1dp2", "--nproc", "0")
    assert r.code == 2 and "step" in r.err and "model_optim_rng.pt" in r.err, r.err
    assert not (tmp_path / "d").exists()
    _convert(cli, s, tmp_path / "e", "tp1pp1ep2dp4")
    assert cli("verify", s, tmp_path / "e").code == 0


def test_merge_and_split_common_unit():
    """The group rules on plain dicts: split keeps each group where its params are; merge needs equality."""
    base = {"lr": 1e-3, "weight_decay": 0.01, "wd_mult": 1.0, "max_lr": 1e-3, "step": 5.0}
    dense = {"optimizer": {"param_groups": [{**base, "is_expert_parallel": False},
                                           {**base, "wd_mult": 0.0, "is_expert_parallel": False}]}}
    expert = {"optimizer": {"param_groups": [{**base, "is_expert_parallel": True}]}}
    assert merge_subs([dense, expert], "distributed", "x") == [dense]
    bad = {"optimizer": {"param_groups": [{**base, "lr": 2e-3, "is_expert_parallel": True}]}}
    with pytest.raises(BadInput, match="expert param group 0 .*lr=0.002"):
        merge_subs([dense, bad], "distributed", "x")
    scaled = {**expert, "grad_scaler": {"scale": torch.tensor(2.0)}}
    with pytest.raises(BadInput, match="grad scaler"):
        merge_subs([dense, scaled], "distributed", "x")
    assert canon(-0.0) != canon(0.0) and canon(torch.tensor(1.0)) != canon(torch.tensor(1))
