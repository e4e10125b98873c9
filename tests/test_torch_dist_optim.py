"""Distributed-optimizer state in torch_dist (ckptctl/formats/torch_dist_optim.py): round trips through both
sharding types with a layout change, independently written expectations of keys and chunk contents, bad input.
All in process (no torchrun); megatron-core's own files are checked in tests/test_interop_torch_dist_optim.py."""
from __future__ import annotations

import io
import math
import shutil

import pytest
import torch

from ckptctl.errors import BadInput
from ckptctl.formats import torch_dist as td
from ckptctl.formats import torch_dist_optim as tdo

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
    shutil.copytree(pair / mode, bad)
    ck = td.open_dist(bad)
    key = next(k for k in ck.index["tensors"] if k.startswith("optimizer.") and "exp_avg_sq" in k
               and (k.endswith("linear_fc2.weight") or "bucket_idx_0" in k))
    off, sizes, f, at, n = ck.index["tensors"][key]["chunks"][0]
    t = td.load_tensor(ck.iter_dir, [f, at, n], key).clone()
    t.view(torch.int32).reshape(-1)[1] ^= 1
    buf = io.BytesIO()
    torch.save(t, buf)
    assert len(buf.getvalue()) == n
    with open(ck.iter_dir / f, "r+b") as fh:
        fh.seek(at)
        fh.write(buf.getvalue())
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
    ck = td.open_dist(pair / "dp_reshardable")
    for c in ("param", "exp_avg", "exp_avg_sq"):
        key = f"optimizer.distributed.dp_group_idx_1.gbuf_idx_0.{F32}.bucket_idx_0.{c}"
        t = ck.index["tensors"][key]
        assert t["shape"] == [n]
        whole = torch.zeros(n)
        for off, sizes, *ref_ in t["chunks"]:
            whole[off[0]:off[0] + sizes[0]] = td.load_tensor(ck.iter_dir, ref_, key)
        assert raw(whole) == raw(ref[c])
        starts = {off[0] for off, *_ in t["chunks"]}
        padded = math.ceil(n / 128) * 128
        assert 0 in starts and padded // 2 in starts
        assert sum(s[0] for _, s, *_ in t["chunks"]) == n
    assert f"optimizer.distributed.dp_group_idx_1.{F32}" not in ck.index["tensors"]
    obj = lambda w: td.load_object(ck.iter_dir, ck.index["objects"][f"optimizer.distributed.dp_group_idx_1.{w}/shard_0_1"], w)  # noqa: E731
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
    ck = td.open_dist(pair / "fully_reshardable")
    t = ck.index["tensors"]["optimizer.state.exp_avg.output_layer.weight"]
    (off, sizes, *r), = t["chunks"]
    got = td.load_tensor(ck.iter_dir, r, "x")
    v, h = t["shape"]
    assert raw(got.reshape(-1)) == raw(ref["exp_avg"][:v * h])
    b = ck.index["tensors"]["optimizer.state.param.decoder.final_layernorm.bias"]
    (_, _, *rb), = b["chunks"]
    start = -(-v * h // 64) * 64
    assert raw(td.load_tensor(ck.iter_dir, rb, "b")) == raw(ref["param"][start:start + h])
    assert ck.common["optimizer"]["param_state_sharding_type"] == "fully_reshardable"
    assert ck.common["optimizer"]["optimizer"]["param_groups"][0]["step"] == 10.0


def test_unknown_or_bad_sharding_is_refused(pair, cli, tmp_path):
    from ckptctl.layout import Layout
    ck = td.open_dist(pair / "dp_reshardable")
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
    md = td.load_metadata(bad / "iter_0000010" / ".metadata")
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
    t = td.open_dist(tmp_path / "t4").index["tensors"]["optimizer.state.exp_avg.embedding.word_embeddings.weight"]
    assert t["shape"][0] == 512 and len(t["chunks"]) == 4
    assert cli("verify", pair / "leg", tmp_path / "t4").code == 0
