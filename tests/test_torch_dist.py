"""torch_dist (DCP) format: the pure chunk <-> store planning, safe loading, and CLI round trips.

Expectations are written out by hand (chunk boxes of a tiny model), not computed by the code under test.
The megatron-core oracle is in test_interop_torch_dist.py.
"""
import json

import pytest
import torch

from ckptctl.box import Box
from ckptctl.errors import BadInput
from ckptctl.example import make_config
import ckptctl.formats.torch_dist.metadata as td_metadata
import ckptctl.formats.torch_dist.names as td_names
import ckptctl.formats.torch_dist.source as td_source
import ckptctl.formats.torch_dist.target as td_target
from ckptctl.layout import Layout, parse_layout
from ckptctl.models import get_family
from ckptctl.models.config import ModelConfig
from ckptctl.models.rules import Piece
from conftest import flip_dist_chunk, load, rank_files, raw_bytes

GPT = get_family("gpt")


def cfg(**o):
    c = make_config("gpt", {"layers": 2, "hidden": 4, "heads": 2, "ffn": 8, "vocab": 100, **o})
    return ModelConfig(**{**c.__dict__, "padded_vocab": 128})


def chunk(off, sizes, f="__0_0.distcp", at=0):
    return [off, sizes, f, at, 10]


def index(tensors, objects=()):
    order = list(tensors) + list(objects)
    return {"tensors": tensors, "objects": {o: ["__0_0.distcp", 0, 1] for o in objects}, "order": order}


def test_stacked_chunks_map_to_per_layer_arrays():
    # GLU fc1 (2 layers, 2F=16 rows, H=4) saved at TP2: rank r holds rows [rF/2, ..) of W and of V.
    t = {"shape": [2, 16, 4], "dtype": "float32", "chunks": [
        chunk([0, 0, 0], [1, 4, 4], at=0), chunk([0, 8, 0], [1, 4, 4], at=10), chunk([0, 4, 0], [1, 4, 4], at=20),
        chunk([0, 12, 0], [1, 4, 4], at=30), chunk([1, 0, 0], [1, 16, 4], at=40)]}
    plan = td_source.plan_source(GPT, cfg(swiglu=True), Layout(tp=2), index({"decoder.layers.mlp.linear_fc1.weight": t}), "te")
    a0, a1 = "model/decoder.layers.0.mlp.linear_fc1.weight", "model/decoder.layers.1.mlp.linear_fc1.weight"
    assert plan.arrays[a0]["shape"] == [16, 4] and plan.arrays[a1]["shape"] == [16, 4]
    assert [u.dirname for u in plan.files] == ["objects"] + [f"__0_0.distcp@{i}" for i in (0, 10, 20, 30, 40)]
    items = [u.items[0] for u in plan.files[1:]]
    assert items[1].pieces == (Piece(Box((0, 0), (4, 4)), a0, Box((8, 0), (4, 4))),)
    assert items[1].shape == (4, 4) and items[1].gkey == "decoder.layers.0.mlp.linear_fc1.weight"
    assert items[4].pieces == (Piece(Box((0, 0), (16, 4)), a1, Box((0, 0), (16, 4))),)
    assert all(all(i.owned) for i in items)
    assert [e["gkey"] for e in plan.manifest] == ["decoder.layers.0.mlp.linear_fc1.weight",
                                                  "decoder.layers.1.mlp.linear_fc1.weight",
                                                  "output_layer._extra_state"]


def test_chunk_spanning_layers_is_cut_per_layer():
    t = {"shape": [2, 4], "dtype": "bfloat16", "chunks": [chunk([0, 0], [2, 4])]}
    plan = td_source.plan_source(GPT, cfg(), Layout(), index({"decoder.layers.self_attention.linear_qkv.layer_norm_weight": t}),
                          "local")
    i0, i1 = plan.files[1].items                 # one unit (one blob), one item per layer
    assert (i0.key, i1.key) == ("[[0, 0], 0]", "[[0, 0], 1]")
    assert i0.pieces == (Piece(Box((0,), (4,)), "model/decoder.layers.0.input_layernorm.weight", Box((0,), (4,))),)
    assert i1.pieces == (Piece(Box((0,), (4,)), "model/decoder.layers.1.input_layernorm.weight", Box((0,), (4,))),)


def test_missing_or_overlapping_chunks_are_refused():
    half = {"shape": [128, 4], "dtype": "float32", "chunks": [chunk([0, 0], [64, 4])]}
    with pytest.raises(BadInput, match="cover 256 of its 512"):
        td_source.plan_source(GPT, cfg(), Layout(), index({"embedding.word_embeddings.weight": half}), "te")
    over = {"shape": [128, 4], "dtype": "float32", "chunks": [chunk([0, 0], [128, 4]), chunk([64, 0], [64, 4])]}
    with pytest.raises(BadInput, match="overlaps"):
        td_source.plan_source(GPT, cfg(), Layout(), index({"embedding.word_embeddings.weight": over}), "te")
    bad = {"shape": [3, 4], "dtype": "float32", "chunks": [chunk([0, 0], [3, 4])]}
    with pytest.raises(BadInput, match="layer axis"):
        td_source.plan_source(GPT, cfg(), Layout(), index({"decoder.layers.pre_mlp_layernorm.weight": bad}), "te")
    unknown = {"shape": [2, 4], "dtype": "float32", "chunks": [chunk([0, 0], [2, 4])]}
    with pytest.raises(BadInput, match="unknown parameter name"):
        td_source.plan_source(GPT, cfg(), Layout(), index({"decoder.layers.mystery.weight": unknown}), "te")


def test_objects_extra_state_and_output_layer_key():
    t = {"shape": [128, 4], "dtype": "float32", "chunks": [chunk([0, 0], [128, 4])]}
    idx = index({"embedding.word_embeddings.weight": t},
                ["decoder.layers.mlp.linear_fc2._extra_state/shard_1_2", "common_state/shard_0_1",
                 "rng_state/shard_0.1_1.2"])
    plan = td_source.plan_source(GPT, cfg(tied=True), Layout(tp=2), idx, "te")
    objs = [(o.gkey, o.slot) for o in plan.files[0].objects]
    assert objs == [("decoder.layers.1.mlp.linear_fc2._extra_state",
                     "decoder.layers.1.mlp.linear_fc2._extra_state|torch_dist|0")]
    kinds = {e["gkey"]: e["kind"] for e in plan.manifest}
    assert kinds["output_layer._extra_state"] == "object"       # mcore drops it; legacy files have it
    assert td_names.rng_slot("rng_state/shard_0.1_1.2", Layout(tp=2)) == "rng@mp_rank_01"
    assert td_names.rng_slot("rng_state/shard_1.0_2.2", Layout(tp=2, pp=2)) == "rng@mp_rank_00_001"


def test_target_chunks_as_mcore_saves_them():
    # GPT swiglu, TP2 PP1, F=8 H=4: fc1 local [W_r; V_r] (8 rows) -> two chunks per rank and layer.
    c = cfg(swiglu=True)
    src = td_source.plan_source(GPT, c, Layout(), index({
        "decoder.layers.mlp.linear_fc1.weight": {"shape": [2, 16, 4], "dtype": "float32",
                                                "chunks": [chunk([0, 0, 0], [2, 16, 4])]},
        "decoder.layers.mlp.linear_fc2.weight": {"shape": [2, 4, 8], "dtype": "float32",
                                                "chunks": [chunk([0, 0, 0], [2, 4, 8])]},
        "decoder.layers.self_attention.linear_qkv.layer_norm_weight": {
            "shape": [2, 4], "dtype": "float32", "chunks": [chunk([0, 0], [2, 4])]},
        "embedding.word_embeddings.weight": {"shape": [128, 4], "dtype": "float32",
                                             "chunks": [chunk([0, 0], [128, 4])]},
    }), "local")
    plan = td_target.plan_target(GPT, c, parse_layout("tp2pp1"), src.manifest, src.arrays, set())
    got = {(ch.fqn, ch.offsets, ch.sizes, ch.gshape) for ch in plan.chunks}
    fc1 = "decoder.layers.mlp.linear_fc1.weight"
    # rank 0: W rows 0..4 and V rows 8..12; rank 1: W 4..8, V 12..16 (as separate chunks)
    want_fc1 = {(fc1, (l, o, 0), (1, 4, 4), (2, 16, 4)) for l in (0, 1) for o in (0, 8, 4, 12)}
    assert {g for g in got if g[0] == fc1} == want_fc1
    fc2 = "decoder.layers.mlp.linear_fc2.weight"
    assert {g for g in got if g[0] == fc2} == {(fc2, (l, 0, o), (1, 4, 4), (2, 4, 8)) for l in (0, 1) for o in (0, 4)}
    norm = "decoder.layers.self_attention.linear_qkv.layer_norm_weight"       # local name -> TE name, once
    assert {g for g in got if g[0] == norm} == {(norm, (l, 0), (1, 4), (2, 4)) for l in (0, 1)}
    emb = "embedding.word_embeddings.weight"                                  # target Vp = 256 at TP2
    assert {g for g in got if g[0] == emb} == {(emb, (0, 0), (128, 4), (256, 4)), (emb, (128, 0), (128, 4), (256, 4))}
    e1 = next(ch for ch in plan.chunks if ch.fqn == emb and ch.offsets == (128, 0))
    assert e1.parts == ()                                                    # rows past the store: zeros
    assert plan.local_names


def test_metadata_unpickler_refuses_foreign_globals(tmp_path):
    p = tmp_path / ".metadata"
    p.write_bytes(b"cos\nsystem\n(S'echo pwned'\ntR.")
    with pytest.raises(BadInput, match="refusing to unpickle os.system"):
        td_metadata.load_metadata(p)
    p.write_bytes(b"\x80\x04garbage")
    with pytest.raises(BadInput, match="corrupt"):
        td_metadata.load_metadata(p)


@pytest.fixture(scope="module")
def dist_pair(tmp_path_factory):
    """A legacy example (tp2pp2, GLU, GQA, odd vocab) and its torch_dist conversion at tp1pp2."""
    from conftest import run_cli
    d = tmp_path_factory.mktemp("td")
    r = run_cli("example", "gpt", "--layout", "tp2pp2", "--out", d / "leg", "--swiglu", "--groups", "2",
                "--vocab", "127", "--layers", "4", "--optimizer", "none")
    assert r.code == 0, r.err
    r = run_cli("convert", d / "leg", d / "dist", "--to", "tp1pp2", "--to-format", "torch_dist", "--nproc", "2", "--json")
    assert r.code == 0, r.err
    return d


def test_writer_layout_on_disk(dist_pair):
    it = dist_pair / "dist" / "iter_0000010"
    assert (dist_pair / "dist" / "latest_checkpointed_iteration.txt").read_text() == "10"
    assert json.loads((it / "metadata.json").read_text())["sharded_backend"] == "torch_dist"
    assert sorted(p.name for p in it.glob("*.distcp")) == ["__0_0.distcp", "__1_0.distcp"]
    assert not list(it.glob("*.tmp"))
    ck = td_metadata.open_dist(dist_pair / "dist")
    assert ck.common["iteration"] == 10 and ck.args["ckpt_format"] == "torch_dist"
    assert ck.args["tensor_model_parallel_size"] == 1 and ck.args["transformer_impl"] == "local"
    assert ck.common["content_metadata"] == {"singleton_local_shards": False, "chained_optim_avoid_prefix": True}
    assert ck.index["tensors"]["embedding.word_embeddings.weight"]["shape"] == [128, 64]
    assert ck.index["tensors"]["decoder.layers.mlp.linear_fc1.weight"]["shape"] == [4, 256, 64]
    assert "rng_state/shard_0.0_2.1" in ck.index["objects"]


def test_verify_across_formats_and_back(dist_pair, tmp_path, cli):
    v = cli("verify", dist_pair / "leg", dist_pair / "dist", "--json")
    assert v.code == 0, v.out
    assert v.json()["tensors"] == v.json()["equal"] > 30
    # torch_dist -> torch_dist is the default target format of a torch_dist source.
    assert cli("convert", dist_pair / "dist", tmp_path / "d2", "--to", "tp2pp1", "--nproc", "0").code == 0
    assert td_metadata.is_torch_dist(tmp_path / "d2")
    r = cli("convert", tmp_path / "d2", tmp_path / "back", "--to", "tp2pp2", "--to-format", "legacy", "--nproc", "0")
    assert r.code == 0, r.err
    for f in rank_files(dist_pair / "leg"):
        want, got = load(f)["model"], load(tmp_path / "back" / f.relative_to(dist_pair / "leg"))["model"]
        assert list(want) == list(got)                    # same keys (local names), same order
        for k, t in want.items():
            assert (raw_bytes(got[k]) == raw_bytes(t)) if torch.is_tensor(t) else got[k] is None, k


def test_flipped_chunk_is_found(dist_pair, tmp_path, cli):
    bad = tmp_path / "bad"
    off = flip_dist_chunk(dist_pair / "dist", bad, "decoder.layers.mlp.linear_fc2.weight", (0, 3, 5))
    v = cli("verify", dist_pair / "leg", bad, "--json")
    assert v.code == 1
    (d,) = v.json()["differences"]
    assert d["key"] == f"decoder.layers.{off[0]}.mlp.linear_fc2.weight" and d["count"] == 1


def test_truncated_or_incomplete_checkpoints_are_bad_input(dist_pair, tmp_path, cli):
    import shutil
    cut = tmp_path / "cut"
    shutil.copytree(dist_pair / "dist", cut)
    p = cut / "iter_0000010" / "__1_0.distcp"
    p.write_bytes(p.read_bytes()[:1000])
    r = cli("convert", cut, tmp_path / "o", "--to", "tp1pp1", "--nproc", "0")
    assert r.code == 2 and "truncated" in r.err and "__1_0.distcp" in r.err
    assert not (tmp_path / "o").exists()
    (cut / "iter_0000010" / ".metadata").unlink()
    r = cli("verify", cut, dist_pair / "leg")
    assert r.code == 2 and ".metadata" in r.err


def test_example_format_torch_dist_holds_the_legacy_example(tmp_path, cli):
    opts = ["--swiglu", "--groups", "2", "--layers", "2", "--tied", "--optimizer", "none"]
    assert cli("example", "gpt", "--layout", "tp1pp2", "--out", tmp_path / "leg", *opts).code == 0
    r = cli("example", "gpt", "--layout", "tp1pp2", "--out", tmp_path / "td", "--format", "torch_dist", *opts)
    assert r.code == 0, r.err
    assert td_metadata.is_torch_dist(tmp_path / "td") and not list(tmp_path.glob(".td.*"))
    # tied at PP2: the output copy is a replica of the embedding key, not stored
    assert "output_layer.weight" not in td_metadata.open_dist(tmp_path / "td").index["tensors"]
    v = cli("verify", tmp_path / "leg", tmp_path / "td", "--json")
    assert v.code == 0, v.out
    assert cli("example", "gpt", "--out", tmp_path / "x", "--format", "zip").code == 2


def test_optimizer_and_rerun_entries_are_dropped_not_refused():
    emb = {"shape": [128, 4], "dtype": "float32", "chunks": [chunk([0, 0], [128, 4])]}
    opt = {"shape": [2, 4], "dtype": "float32", "chunks": [chunk([0, 0], [2, 4], at=10)]}
    idx = index({"embedding.word_embeddings.weight": emb,
                 "optimizer.state.exp_avg.decoder.layers.pre_mlp_layernorm.weight": opt},
                ["rerun_state_machine_state/shard_0_1"])
    plan = td_source.plan_source(GPT, cfg(), Layout(), idx, "te")
    assert list(plan.arrays) == ["model/embedding.word_embeddings.weight"]
    assert td_source.dropped_keys(idx) == ["optimizer", "rerun_state_machine_state"]


# --- MoE experts and Mamba segments (hand-written chunk boxes as megatron-core 0.19.2 cuts them) ---------

def moe_cfg(**o):
    c = make_config("moe", {"layers": 2, "hidden": 4, "heads": 2, "ffn": 8, "vocab": 100, "experts": 4,
                            "moe_ffn": 8, "swiglu": True, "bias": False, **o})
    return ModelConfig(**{**c.__dict__, "padded_vocab": 128})


def expert_index():
    """TP1 EP1 save: one chunk per (layer, expert) and W/V block; extra state per (layer, expert)."""
    fc1, fc2 = "decoder.layers.mlp.experts.experts.linear_fc1.weight", "decoder.layers.mlp.experts.experts.linear_fc2.weight"
    ix = index({
        fc1: {"shape": [2, 4, 16, 4], "dtype": "float32",
              "chunks": [chunk([l, g, o, 0], [1, 1, 8, 4]) for l in (0, 1) for g in range(4) for o in (0, 8)]},
        fc2: {"shape": [2, 4, 4, 8], "dtype": "float32",
              "chunks": [chunk([l, g, 0, 0], [1, 1, 4, 8]) for l in (0, 1) for g in range(4)]},
    }, [f"decoder.layers.mlp.experts.experts.linear_fc{i}._extra_state/shard_{l}.{g}_2.4"
        for l in (0, 1) for g in range(4) for i in (1, 2)])
    # the sharded state dict's order: each linear's weight, then its extra state
    ix["order"] = [fc1] + ix["order"][2:3] + [fc2] + ix["order"][3:]
    return ix


@pytest.mark.parametrize("grouped", [False, True])
def test_expert_chunks_map_to_stacked_expert_arrays(grouped):
    moe = get_family("moe")
    plan = td_source.plan_source(moe, moe_cfg(grouped=grouped), Layout(), expert_index(), "te")
    a = "model/decoder.layers.1.mlp.experts.linear_fc1.weight"
    assert plan.arrays[a]["shape"] == [4, 16, 4]
    items = {(u.items[0].key, u.items[0].pieces) for u in plan.files[1:] if u.items[0].pieces[0].array == a}
    # chunk (layer 1, expert 2, V rows 8..16) -> box (2, 8, 0) of the layer-1 array, one expert deep
    assert (json.dumps([[1, 2, 8, 0], 0]), (Piece(Box((0, 0, 0), (1, 8, 4)), a, Box((2, 8, 0), (1, 8, 4))),)) in items
    keys = [e["gkey"] for e in plan.manifest]
    if grouped:   # TEGroupedMLP: weight0..3 per linear, one extra state (not carried: written empty)
        assert keys[:5] == [f"decoder.layers.0.mlp.experts.linear_fc1.weight{g}" for g in range(4)] + [
            "decoder.layers.0.mlp.experts.linear_fc1._extra_state"]
        assert not plan.files[0].items
    else:         # SequentialMLP: expert by expert, fc1 then fc2, each with its extra state
        p = "decoder.layers.0.mlp.experts.local_experts"
        assert keys[:4] == [f"{p}.0.linear_fc1.weight", f"{p}.0.linear_fc1._extra_state",
                            f"{p}.0.linear_fc2.weight", f"{p}.0.linear_fc2._extra_state"]
        assert len(plan.files[0].items) == 16


def test_expert_target_chunks_as_mcore_saves_them():
    # tp2 ep2 etp2: ETP rank r holds fc1 rows [rF/2, ..) of W and of V (two chunks), fc2 columns; the
    # expert axis follows the layer axis; one extra-state object per (layer, expert).
    moe, c = get_family("moe"), moe_cfg()
    src = td_source.plan_source(moe, c, Layout(), expert_index(), "te")
    plan = td_target.plan_target(moe, c, parse_layout("tp2pp1ep2etp2"), src.manifest, src.arrays, set())
    got = {(ch.fqn, ch.offsets, ch.sizes, ch.gshape) for ch in plan.chunks}
    fc1, fc2 = "decoder.layers.mlp.experts.experts.linear_fc1.weight", "decoder.layers.mlp.experts.experts.linear_fc2.weight"
    assert {g for g in got if g[0] == fc1} == {(fc1, (l, e, o, 0), (1, 1, 4, 4), (2, 4, 16, 4))
                                               for l in (0, 1) for e in range(4) for o in (0, 4, 8, 12)}
    assert {g for g in got if g[0] == fc2} == {(fc2, (l, e, 0, o), (1, 1, 4, 4), (2, 4, 4, 8))
                                               for l in (0, 1) for e in range(4) for o in (0, 4)}
    assert sorted(n for n, _, _ in plan.objects) == sorted(
        f"decoder.layers.mlp.experts.experts.linear_fc{i}._extra_state/shard_{l}.{e}_2.4"
        for l in (0, 1) for e in range(4) for i in (1, 2))
    v = next(ch for ch in plan.chunks if ch.fqn == fc1 and ch.offsets == (1, 3, 12, 0))   # V_1 of expert 3
    assert v.parts == (Piece(Box((0, 0, 0, 0), (1, 1, 4, 4)), "model/decoder.layers.1.mlp.experts.linear_fc1.weight",
                             Box((3, 12, 0), (1, 4, 4))),)


def test_mamba_segments_are_numbered_keys_of_their_own():
    # HybridStack: numbered layer keys; MambaMixer splits in_proj into z, x, B, C, dt and conv1d into x, B, C
    # (ShardedTensorFactory), each TP-split on its own; conv1d keeps its DCP name `conv1d.weight`.
    mamba = get_family("mamba")
    c = make_config("mamba", {"layers": 1, "hidden": 4, "pattern": "M", "mamba_heads": 4, "mamba_head_dim": 2,
                              "mamba_groups": 2, "mamba_state": 2, "vocab": 100})
    c = ModelConfig(**{**c.__dict__, "padded_vocab": 128})
    seg = {"z": 8, "x": 8, "B": 4, "C": 4, "dt": 4}
    t = {f"decoder.layers.0.mixer.in_proj.weight.{s}": {"shape": [n, 4], "dtype": "float32",
                                                        "chunks": [chunk([0, 0], [n, 4])]} for s, n in seg.items()}
    t.update({f"decoder.layers.0.mixer.conv1d.weight.{s}": {"shape": [seg[s], 1, 4], "dtype": "float32",
                                                           "chunks": [chunk([0, 0, 0], [seg[s], 1, 4])]} for s in "xBC"})
    src = td_source.plan_source(mamba, c, Layout(), index(t), "te")
    # megatron-core's module order (MambaMixer's own conv1d_weight before its child in_proj), whatever the
    # order of `.metadata` (here in_proj first)
    assert [e["gkey"] for e in src.manifest] == ["decoder.layers.0.mixer.conv1d_weight",
                                                 "decoder.layers.0.mixer.in_proj.weight"]
    assert src.arrays["model/decoder.layers.0.mixer.conv1d_weight.B"]["shape"] == [4, 1, 4]
    plan = td_target.plan_target(mamba, c, parse_layout("tp2pp1"), src.manifest, src.arrays, set())
    got = {(ch.fqn, ch.offsets, ch.sizes, ch.gshape) for ch in plan.chunks}
    want = {(f"decoder.layers.0.mixer.in_proj.weight.{s}", (r * n // 2, 0), (n // 2, 4), (n, 4))
            for s, n in seg.items() for r in (0, 1)}
    want |= {(f"decoder.layers.0.mixer.conv1d.weight.{s}", (r * seg[s] // 2, 0, 0), (seg[s] // 2, 1, 4), (seg[s], 1, 4))
             for s in "xBC" for r in (0, 1)}
    assert got == want


@pytest.mark.parametrize("family,layout,target,opts", [
    ("moe", "tp2pp2ep2", "tp1pp1ep4", ["--grouped", "--swiglu"]),
    ("mamba", "tp2pp1ep2", "tp1pp2", ["--pattern", "M*EM", "--layers", "4", "--experts", "4", "--moe-ffn", "32"]),
])
def test_expert_and_mamba_examples_round_trip_across_formats(tmp_path, cli, family, layout, target, opts):
    o = ["--layout", layout, "--optimizer", "none", *opts]
    assert cli("example", family, "--out", tmp_path / "leg", *o).code == 0
    r = cli("example", family, "--out", tmp_path / "td", "--format", "torch_dist", *o)
    assert r.code == 0, r.err
    r = cli("convert", tmp_path / "td", tmp_path / "back", "--to", target, "--to-format", "legacy", "--nproc", "0")
    assert r.code == 0, r.err
    for a, b in (("leg", "td"), ("td", "back")):
        v = cli("verify", tmp_path / a, tmp_path / b, "--json")
        assert v.code == 0 and v.json()["equal"] == v.json()["tensors"] > 30, v.out


def test_moe_layer_freq_makes_numbered_keys():
    # TransformerBlock: moe_layer_freq > 1 (or a list) -> non-homogeneous layers -> `decoder.layers.<i>.` keys,
    # the expert axis first; a stacked model with every layer MoE keeps the layer axis.
    moe = get_family("moe")
    from ckptctl.formats.torch_dist import traits
    assert traits.stacked(moe, moe_cfg()) and not traits.stacked(moe, moe_cfg(moe_layer_freq=[0, 1]))
    c = moe_cfg(moe_layer_freq=[0, 1])
    fc1 = "decoder.layers.1.mlp.experts.experts.linear_fc1.weight"
    ix = index({fc1: {"shape": [4, 16, 4], "dtype": "float32",
                      "chunks": [chunk([g, 0, 0], [1, 16, 4]) for g in range(4)]}},
               [f"decoder.layers.1.mlp.experts.experts.linear_fc1._extra_state/shard_{g}_4" for g in range(4)])
    src = td_source.plan_source(moe, c, Layout(), ix, "te")
    assert src.arrays["model/decoder.layers.1.mlp.experts.linear_fc1.weight"]["shape"] == [4, 16, 4]
    plan = td_target.plan_target(moe, c, parse_layout("tp1pp1ep2"), src.manifest, src.arrays, set())
    assert {(ch.fqn, ch.offsets, ch.sizes, ch.gshape) for ch in plan.chunks} == {
        (fc1, (g, o, 0), (1, 8, 4), (4, 16, 4)) for g in range(4) for o in (0, 8)}
    assert sorted(n for n, _, _ in plan.objects) == [ix["order"][1 + g] for g in range(4)]
