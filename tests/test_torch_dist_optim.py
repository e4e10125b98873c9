"""Distributed-optimizer state in torch_dist (ckptctl/formats/torch_dist/optim_*.py): round trips through both
sharding types with a layout change, independently written expectations of keys and chunk contents, bad input.
All in process (no torchrun); megatron-core's own files are checked in tests/test_interop_torch_dist_optim.py."""
from __future__ import annotations

import math
import shutil

import pytest
import torch

from ckptctl.errors import BadInput
import ckptctl.formats.torch_dist.metadata as td_metadata
from ckptctl.formats.torch_dist import optim_info as tdo
from conftest import flip_dist_chunk

OPTS = ["--swiglu", "--groups", "2", "--layers", "2", "--optimizer", "distributed"]
F32 = "dtype_(torch.float32, torch.float32)"


def raw(t: torch.Tensor) -> bytes:
    return t.contiguous().view(torch.uint8).numpy().tobytes()


def flat(path):
    """The one buffer of a single-sub-optimizer distrib_optim.pt: {comp: tensor, numel_unpadded}."""
    return torch.load(path, weights_only=False)[0][(torch.float32, torch.float32)]


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """legacy tp2pp2dp2 (distributed optimizer) -> torch_dist tp1pp2dp2 in each mode -> legacy tp2pp2dp2."""
    from conftest import run_cli
    d = tmp_path_factory.mktemp("tdo")
    assert run_cli("example", "gpt", "--layout", "tp2pp2dp2", "--out", d / "leg", *OPTS).code == 0
    for m in tdo.SHARDING_TYPES:
        r = run_cli("convert", d / "leg", d / m, "--to", "tp1pp2dp2", "--to-format", "torch_dist",
                    "--optim-sharding", m, "--nproc", "0")
        assert r.code == 0, r.err
        r = run_cli("convert", d / m, d / f"back_{m}", "--to", "tp2pp2dp2", "--to-format", "legacy", "--nproc", "0")
        assert r.code == 0, r.err
    return d


@pytest.mark.parametrize("mode", tdo.SHARDING_TYPES)
def test_round_trip_is_byte_equal(pair, mode):
    files = sorted((pair / "leg").glob("iter_*/*/distrib_optim.pt"))
    assert len(files) == 4
    for f in files:
        a, b = flat(f), flat(pair / f"back_{mode}" / f.relative_to(pair / "leg"))
        assert a["numel_unpadded"] == b["numel_unpadded"]
        for c in ("param", "exp_avg", "exp_avg_sq"):
            assert raw(a[c]) == raw(b[c]), (f, c)


@pytest.mark.parametrize("mode", tdo.SHARDING_TYPES)
def test_verify_compares_optimizer_across_formats(pair, mode, cli, tmp_path):
    v = cli("verify", pair / "leg", pair / mode, "--json")
    assert v.code == 0, v.out
    rows = [r["key"] for r in v.json()["table"]]
    assert "optim/exp_avg/decoder.layers.1.mlp.linear_fc1.weight" in rows
    # a flipped bit in one optimizer chunk is reported (bitwise, not allclose)
    bad = tmp_path / "bad"
    ck = td_metadata.open_dist(pair / mode)
    key = next(k for k in ck.index["tensors"] if k.startswith("optimizer.") and "exp_avg_sq" in k
               and (k.endswith("linear_fc2.weight") or "bucket_idx_0" in k))
    flip_dist_chunk(pair / mode, bad, key, 1)
    v = cli("verify", pair / "leg", bad, "--json")
    assert v.code == 1
    assert any(d["key"].startswith("optim/exp_avg_sq/") for d in v.json()["differences"])


def test_dp_reshardable_keys_and_chunks_independently(pair):
    """tp1pp2dp2, stage 1 (dp_group_idx_1): one bucket (overlap_grad_reduce off) whose global tensor is the
    legacy flat buffer of mp_rank_00_001 at tp1pp2; DP rank 1's share starts at half the bucket padded to
    lcm(2, 128); objects name the optimizer's param groups and per-bucket sizes."""
    from ckptctl.layout import parse_layout
    r = pair / "leg_tp1"
    from ckptctl.convert import convert
    convert(pair / "leg", r, parse_layout("tp1pp2dp2"), nproc=0)
    ref = flat(r / "iter_0000010" / "mp_rank_00_001" / "distrib_optim.pt")
    n = ref["numel_unpadded"]
    ck = td_metadata.open_dist(pair / "dp_reshardable")
    for c in ("param", "exp_avg", "exp_avg_sq"):
        key = f"optimizer.distributed.dp_group_idx_1.gbuf_idx_0.{F32}.bucket_idx_0.{c}"
        t = ck.index["tensors"][key]
        assert t["shape"] == [n]
        whole = torch.zeros(n)
        for off, sizes, *ref_ in t["chunks"]:
            whole[off[0]:off[0] + sizes[0]] = td_metadata.load_tensor(ck.iter_dir, ref_, key)
        assert raw(whole) == raw(ref[c])
        starts = {off[0] for off, *_ in t["chunks"]}
        padded = math.ceil(n / 128) * 128
        assert 0 in starts and padded // 2 in starts
        assert sum(s[0] for _, s, *_ in t["chunks"]) == n
    assert f"optimizer.distributed.dp_group_idx_1.{F32}" not in ck.index["tensors"]
    obj = lambda w: td_metadata.load_object(ck.iter_dir, ck.index["objects"][f"optimizer.distributed.dp_group_idx_1.{w}/shard_0_1"], w)  # noqa: E731
    assert obj("per_bucket_numel_unpadded") == [{(torch.float32, torch.float32): [n]}]
    assert obj("per_bucket_numel") == [{(torch.float32, torch.float32): [math.ceil(n / 128) * 128]}]
    assert [g["wd_mult"] for g in obj("optimizer")["param_groups"]] == [1.0, 0.0]
    assert ck.common["optimizer"] == {"param_state_sharding_type": "dp_reshardable"}
    assert ck.common["content_metadata"]["distrib_optim_sharding_type"] == "dp_reshardable"


def test_fully_reshardable_holds_model_shaped_state(pair):
    """The last named parameter (output_layer.weight, untied) sits first in the reversed flat buffer: its
    fully_reshardable exp_avg is the legacy flat exp_avg[:V*h] of the last stage at TP1; the next one
    (final_layernorm.bias) starts at the following multiple of 64."""
    ref = flat(pair / "leg_tp1" / "iter_0000010" / "mp_rank_00_001" / "distrib_optim.pt")
    ck = td_metadata.open_dist(pair / "fully_reshardable")
    t = ck.index["tensors"]["optimizer.state.exp_avg.output_layer.weight"]
    (off, sizes, *r), = t["chunks"]
    got = td_metadata.load_tensor(ck.iter_dir, r, "x")
    v, h = t["shape"]
    assert raw(got.reshape(-1)) == raw(ref["exp_avg"][:v * h])
    b = ck.index["tensors"]["optimizer.state.param.decoder.final_layernorm.bias"]
    (_, _, *rb), = b["chunks"]
    start = -(-v * h // 64) * 64
    assert raw(td_metadata.load_tensor(ck.iter_dir, rb, "b")) == raw(ref["param"][start:start + h])
    assert ck.common["optimizer"]["param_state_sharding_type"] == "fully_reshardable"
    assert ck.common["optimizer"]["optimizer"]["param_groups"][0]["step"] == 10.0


def test_unknown_or_bad_sharding_is_refused(pair, cli, tmp_path):
    from ckptctl.layout import Layout
    ck = td_metadata.open_dist(pair / "dp_reshardable")
    ck.common["content_metadata"] = {**ck.common["content_metadata"], "distrib_optim_sharding_type": "zigzag_buckets"}
    with pytest.raises(BadInput, match="zigzag_buckets"):
        tdo.inspect_info(ck, None, Layout())
    ck.common["content_metadata"]["distrib_optim_sharding_type"] = "dp_zero_gather_scatter"
    assert tdo.inspect_info(ck, None, Layout()) is None      # known to megatron-core, not converted: dropped
    r = cli("convert", pair / "leg", tmp_path / "o", "--to", "tp1pp2dp2", "--to-format", "torch_dist",
            "--optim-sharding", "fully_sharded_model_space", "--nproc", "0")
    assert r.code == 2 and "fully_sharded_model_space" in r.err and not (tmp_path / "o").exists()


def test_missing_bucket_is_bad_input(pair, tmp_path, cli):
    """A bucket count that disagrees with the model's bucket layout is refused, naming the key."""
    bad = tmp_path / "bad"
    shutil.copytree(pair / "dp_reshardable", bad)
    import pickle
    md = td_metadata.load_metadata(bad / "iter_0000010" / ".metadata")
    key = f"optimizer.distributed.dp_group_idx_0.gbuf_idx_0.{F32}.bucket_idx_0.exp_avg"
    real = pickle.loads((bad / "iter_0000010" / ".metadata").read_bytes())
    del real.state_dict_metadata[key]
    real.storage_data = {k: v for k, v in real.storage_data.items() if k.fqn != key}
    (bad / "iter_0000010" / ".metadata").write_bytes(pickle.dumps(real))
    assert key in md.state_dict_metadata
    r = cli("convert", bad, tmp_path / "o", "--to", "tp2pp2dp2", "--to-format", "legacy", "--nproc", "0")
    assert r.code == 2, r.err
    assert "dp_group_idx_0" in r.err


def test_vocab_rows_the_target_adds(pair, cli, tmp_path):
    """tp2 -> tp4 pads the vocab 256 -> 512: the chunks of ranks holding only new rows are written (zeros)
    for the optimizer keys too, so every key is fully covered and verify finds the common rows equal."""
    r = cli("convert", pair / "leg", tmp_path / "t4", "--to", "tp4pp2dp1", "--to-format", "torch_dist",
            "--optim-sharding", "fully_reshardable", "--nproc", "0")
    assert r.code == 0, r.err
    t = td_metadata.open_dist(tmp_path / "t4").index["tensors"]["optimizer.state.exp_avg.embedding.word_embeddings.weight"]
    assert t["shape"][0] == 512 and len(t["chunks"]) == 4
    assert cli("verify", pair / "leg", tmp_path / "t4").code == 0


# --- the non-distributed optimizer (FP32Optimizer / mixed precision with fp32 masters) -----------------

ADAM_OPTS = ["--swiglu", "--groups", "2", "--layers", "2", "--optimizer", "adam"]
ADAM_DTYPES = ("float32", "float16")          # float16: mixed precision with fp32 masters and a grad scaler


@pytest.fixture(scope="module")
def adam(tmp_path_factory):
    """legacy tp2pp2 (Adam state dict) -> torch_dist tp1pp2 -> legacy tp2pp2, per model dtype."""
    from conftest import run_cli
    d = tmp_path_factory.mktemp("tdo_adam")
    for dt in ADAM_DTYPES:
        assert run_cli("example", "gpt", "--layout", "tp2pp2", "--dtype", dt, "--out", d / dt, *ADAM_OPTS).code == 0
        r = run_cli("convert", d / dt, d / f"{dt}_td", "--to", "tp1pp2", "--to-format", "torch_dist", "--nproc", "0",
                    "--json")
        assert r.code == 0, r.err
        (d / f"{dt}_report.json").write_text(r.out)
        r = run_cli("convert", d / f"{dt}_td", d / f"{dt}_back", "--to", "tp2pp2", "--to-format", "legacy",
                    "--nproc", "0")
        assert r.code == 0, r.err
    return d


@pytest.mark.parametrize("dt", ADAM_DTYPES)
def test_adam_round_trip_is_byte_equal(adam, dt):
    """The whole `optimizer` entry of every rank file (state tensors, step, param groups with their indices,
    fp32 masters, grad scaler) comes back byte for byte."""
    from ckptctl.optstate.subopt import canon
    files = sorted((adam / dt).glob("iter_*/*/model_optim_rng.pt"))
    assert len(files) == 4
    for f in files:
        a = torch.load(f, weights_only=False)["optimizer"]
        b = torch.load(adam / f"{dt}_back" / f.relative_to(adam / dt), weights_only=False)["optimizer"]
        assert canon(a) == canon(b), f
    sd = torch.load(files[-1], weights_only=False)["optimizer"]
    assert ("grad_scaler" in sd) == (dt == "float16") and ("state" in sd) == (dt == "float32")


def _legacy_state(path, dt):
    """(state, param_groups, fp32 masters per group) of a legacy rank file's Adam state dict."""
    sd = torch.load(path, weights_only=False)["optimizer"]
    inner = sd if dt == "float32" else sd["optimizer"]
    return inner["state"], inner["param_groups"], sd.get("fp32_from_fp16_params")


@pytest.mark.parametrize("dt", ADAM_DTYPES)
def test_adam_keys_and_chunks_independently(adam, dt):
    """megatron-core's names: optimizer.state.{exp_avg,exp_avg_sq}.<model key> (+ fp32_param.<key> for half
    params), chunked like the model tensor. output_layer.weight is the last weight-decayed parameter of the
    last stage, so its state is index param_groups[0]["params"][-1] of mp_rank_0t_001 (fp32 master: the last
    of fp32_from_fp16_params[0]); the TP1 tensor is the two TP shards stacked on the vocab axis, cut to the
    true vocab."""
    ck = td_metadata.open_dist(adam / f"{dt}_td")
    ts = ck.index["tensors"]
    model = {k for k in ts if not k.startswith("optimizer.")}
    opt = {k for k in ts if k.startswith("optimizer.")}
    names = ("exp_avg", "exp_avg_sq") + (("fp32_param",) if dt == "float16" else ())
    assert opt == {f"optimizer.state.{n}.{k}" for n in names for k in model}      # every model tensor trains
    for k in model:
        for n in names:
            o = ts[f"optimizer.state.{n}.{k}"]
            assert o["shape"] == ts[k]["shape"] and o["dtype"] == "float32"
            assert sorted(c[:2] for c in o["chunks"]) == sorted(c[:2] for c in ts[k]["chunks"])
    it = next((adam / dt).glob("iter_*"))
    shards = [_legacy_state(it / f"mp_rank_0{t}_001" / "model_optim_rng.pt", dt) for t in (0, 1)]
    for n, pick in (("exp_avg", lambda s: s[0][s[1][0]["params"][-1]]["exp_avg"]),
                    ("exp_avg_sq", lambda s: s[0][s[1][0]["params"][-1]]["exp_avg_sq"]),
                    ("fp32_param", lambda s: s[2][0][-1])):
        if n not in names:
            continue
        key = f"optimizer.state.{n}.output_layer.weight"
        (off, sizes, *ref), = ts[key]["chunks"]
        got = td_metadata.load_tensor(ck.iter_dir, ref, key)
        assert got.shape[0] == 128          # the true vocab: TP1 pads none of it, TP2 pads to 256 (rank 1: padding)
        assert raw(got) == raw(torch.cat([pick(s) for s in shards])[:128]), n
    common = ck.common["optimizer"] if dt == "float32" else ck.common["optimizer"]["optimizer"]
    assert set(common) == {"state", "param_groups"}
    step = common["state"]["common_step"]
    assert torch.is_tensor(step) and step.dtype == torch.float32 and float(step) == 10.0
    assert [g["wd_mult"] for g in common["param_groups"]] == [1.0, 0.0]
    assert all("params" not in g for g in common["param_groups"])
    assert ("grad_scaler" in ck.common["optimizer"]) == (dt == "float16")
    assert "distrib_optim_sharding_type" not in ck.common["content_metadata"]


def test_adam_report_says_what_is_written(adam):
    """The convert report names the torch_dist form written, not distrib_optim.pt or a state dict's indices."""
    import json
    pol = json.loads((adam / "float16_report.json").read_text())["policies"]
    assert "distrib_optim.pt" not in pol
    assert "optimizer.state.{fp32_param,exp_avg,exp_avg_sq}.<model key>" in pol["optimizer"]
    assert "param indices rebuilt" not in pol["optimizer"]


@pytest.mark.parametrize("dt", ADAM_DTYPES)
def test_adam_verify_across_formats(adam, dt, cli):
    v = cli("verify", adam / dt, adam / f"{dt}_td", "--json")
    assert v.code == 0, v.out
    rows = {r["key"] for r in v.json()["table"]}
    assert "optim/exp_avg_sq/output_layer.weight" in rows
    assert ("optim/param/output_layer.weight" in rows) == (dt == "float16")


def test_adam_bad_input(adam):
    """Non-Adam state components and an unrecognised common `optimizer` are refused, naming them."""
    from ckptctl.layout import Layout
    ck = td_metadata.open_dist(adam / "float32_td")
    ts = ck.index["tensors"]
    key = next(k for k in ts if k.startswith("optimizer.state.exp_avg_sq."))
    ts[key.replace("exp_avg_sq", "momentum_buffer")] = ts.pop(key)
    with pytest.raises(BadInput, match="momentum_buffer"):
        tdo.inspect_info(ck, None, Layout())
    ck = td_metadata.open_dist(adam / "float32_td")
    ck.common["optimizer"] = {"param_groups": []}
    with pytest.raises(BadInput, match="neither megatron-core's FP32Optimizer"):
        tdo.inspect_info(ck, None, Layout())
    ck = td_metadata.open_dist(adam / "float16_td")          # fp32_param in an fp32 optimizer's checkpoint
    ck.common["optimizer"] = ck.common["optimizer"]["optimizer"]
    with pytest.raises(BadInput, match="fp32_param"):
        tdo.inspect_info(ck, None, Layout())


# --- several sub-optimizers (MoE with EP>1: megatron-core's ChainedOptimizer, dense + expert) -------------

MOE = ["--layout", "tp1ep2dp2", "--layers", "2", "--experts", "4"]


@pytest.fixture(scope="module")
def moe(tmp_path_factory):
    """legacy tp1ep2dp2 (2 sub-optimizers) -> dp_reshardable ep2 (`chained_<i>.`) and fully_reshardable ep2
    ({0:, 1:} common) -> fully_reshardable ep1 (merged: one sub-optimizer) -> legacy ep2 (split again);
    plain Adam ({0:, 1:} common): legacy ep2 -> torch_dist ep2 -> legacy ep2 (its sub-optimizer change goes
    through the same `optim.TargetSide` as the distributed one's)."""
    from conftest import run_cli
    d = tmp_path_factory.mktemp("tdo_moe")
    assert run_cli("example", "moe", *MOE, "--optimizer", "distributed", "--out", d / "leg").code == 0
    assert run_cli("example", "moe", *MOE, "--optimizer", "adam", "--out", d / "adam").code == 0
    steps = [("leg", "dp", "tp1ep2dp2", "torch_dist", "dp_reshardable"),
             ("leg", "fr", "tp1ep2dp2", "torch_dist", "fully_reshardable"),
             ("dp", "ep1", "tp1ep1dp4", "torch_dist", "fully_reshardable"),
             ("ep1", "back", "tp1ep2dp2", "legacy", None),
             ("adam", "adam_td", "tp1ep2dp2", "torch_dist", None),
             ("adam_td", "adam_back", "tp1ep2dp2", "legacy", None)]
    for src, dst, to, fmt, st in steps:
        r = run_cli("convert", d / src, d / dst, "--to", to, "--to-format", fmt, "--nproc", "0",
                    *(["--optim-sharding", st] if st else []))
        assert r.code == 0, (dst, r.err)
    return d


@pytest.mark.parametrize("src,back", [("leg", "back"), ("adam", "adam_back")])
def test_moe_round_trip_through_a_sub_optimizer_change_is_byte_equal(moe, src, back):
    """Every rank file's optimizer entry (and distrib_optim.pt: per sub-optimizer flat buffers, None where
    the rank writes none) comes back byte for byte through torch_dist (distributed: EP2 -> EP1 -> EP2)."""
    from ckptctl.optstate.subopt import canon
    files = sorted((moe / src).glob("iter_*/*/*.pt"))
    assert len(files) == (4 if src == "leg" else 2)
    for f in files:
        a = torch.load(f, weights_only=False)
        b = torch.load(moe / back / f.relative_to(moe / src), weights_only=False)
        if f.name == "model_optim_rng.pt":
            a, b = a["optimizer"], b["optimizer"]
        assert canon(a) == canon(b), f


def test_moe_dp_reshardable_keys_independently(moe):
    """tp1ep2dp2: the dense sub-optimizer (chained_0) has one model-parallel rank (dp_group_idx_0, sharded
    over DP 2); the expert one (chained_1) one per EP rank (dp_group_idx_<ep>, expert DP 1: one chunk per
    param). Expert rank 1's bucket is the expert flat buffer of legacy mp_rank_00_001 (its
    distrib_optim.pt is [None, expert]: DP rank 0 of that file's ranks holds no dense state)."""
    ck = td_metadata.open_dist(moe / "dp")
    ts = ck.index["tensors"]
    groups = {k.split(".gbuf_idx")[0] for k in ts if k.startswith("chained_")}
    assert groups == {"chained_0.optimizer.distributed.dp_group_idx_0", "chained_1.optimizer.distributed.dp_group_idx_0",
                      "chained_1.optimizer.distributed.dp_group_idx_1"}
    assert not any(k.startswith("optimizer.") for k in ts)
    leg = torch.load(next((moe / "leg").glob("iter_*")) / "mp_rank_00_001" / "distrib_optim.pt", weights_only=False)
    assert leg[0] is None
    ref = leg[1][0][(torch.float32, torch.float32)]
    for c in ("param", "exp_avg", "exp_avg_sq"):
        key = f"chained_1.optimizer.distributed.dp_group_idx_1.gbuf_idx_0.{F32}.bucket_idx_0.{c}"
        t = ts[key]
        assert t["shape"] == [ref["numel_unpadded"]]
        whole = torch.zeros(t["shape"][0])
        for off, sizes, *r in t["chunks"]:
            whole[off[0]:off[0] + sizes[0]] = td_metadata.load_tensor(ck.iter_dir, r, key)
        assert raw(whole) == raw(ref[c])
    obj = lambda k: td_metadata.load_object(ck.iter_dir, ck.index["objects"][k + "/shard_0_1"], k)  # noqa: E731
    groups1 = obj("chained_1.optimizer.distributed.dp_group_idx_1.optimizer")["param_groups"]
    assert groups1 and all(g["is_expert_parallel"] for g in groups1)
    assert not any(g["is_expert_parallel"] for g in obj("chained_0.optimizer.distributed.dp_group_idx_0.optimizer")["param_groups"])
    assert ck.common["optimizer"] == {0: {"param_state_sharding_type": "dp_reshardable"},
                                      1: {"param_state_sharding_type": "dp_reshardable"}}


def test_moe_model_space_common_per_sub_optimizer(moe):
    """fully_reshardable and plain Adam keep the model keys (no prefix) and index the common `optimizer` by
    sub-optimizer; at EP1 (one sub-optimizer) the common state is a single entry again."""
    for name, key in (("fr", "optimizer.state.param.decoder.layers.mlp.experts.experts.linear_fc1.weight"),
                      ("adam_td", "optimizer.state.exp_avg.decoder.layers.mlp.experts.experts.linear_fc1.weight")):
        ck = td_metadata.open_dist(moe / name)
        assert key in ck.index["tensors"] and not any(k.startswith("chained_") for k in ck.index["tensors"])
        opt = ck.common["optimizer"]
        assert sorted(opt) == [0, 1], name
        inner = lambda s: s["optimizer"] if "optimizer" in s else s  # noqa: E731
        assert [all(g["is_expert_parallel"] for g in inner(opt[s])["param_groups"]) for s in (0, 1)] == [False, True]
    opt = td_metadata.open_dist(moe / "ep1").common["optimizer"]
    assert 0 not in opt and "optimizer" in opt and opt["param_state_sharding_type"] == "fully_reshardable"
