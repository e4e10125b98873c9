"""Mamba / hybrid rules: split -> merge round trips, hand-written per-rank expectations, the layer pattern's
pipeline split, validation, both conv1d key spellings, and the CLI end to end (in-process workers)."""
from __future__ import annotations

import pytest
import torch

from ckptctl.errors import BadInput, LayoutError
from ckptctl.layout import FileCoord, Layout, parse_layout
from ckptctl.models import detect_family, get_family
from ckptctl.models.config import ModelConfig
from ckptctl.models.gpt import COL, ROW
from ckptctl.models.mamba import conv_rule, dims, in_proj_rule, target_pattern
from ckptctl.models.rules import global_shapes, pieces
from ckptctl.reshard.plan import Inventory, plan_source, plan_target
from conftest import load, raw_bytes, rank_files

NH, HD, NG, DS, H = 8, 4, 4, 3, 16        # heads, head dim, groups, state, hidden: d_inner 32, B/C rows 12


def cfg(pattern="M*M-", groups=NG, heads=NH, **kw) -> ModelConfig:
    extra = {"hybrid_layer_pattern": pattern, "mamba_num_heads": heads, "mamba_head_dim": HD,
             "mamba_num_groups": groups, "mamba_state_dim": DS, "position_embedding_type": "none",
             "add_bias_linear": False, **kw.pop("extra", {})}
    base = dict(family="mamba", num_layers=len(pattern.replace("|", "")), hidden=H, heads=8, groups=8,
                kv_channels=2, ffn=32, glu=False, tied=False, padded_vocab=128, true_vocab=100, vocab_divisor=128,
                extra=extra)
    base.update(kw)
    return ModelConfig(**base)


# --- rules: round trip and independent expectation ----------------------------------------------------

def split_arrays(rule, arrays: dict[str, torch.Tensor], n: int) -> list[torch.Tensor]:
    shapes = {k: tuple(v.shape) for k, v in arrays.items()}
    out = []
    for r in range(n):
        shape, ps = pieces(rule, "a", shapes, n, r)
        local = torch.zeros(shape, dtype=next(iter(arrays.values())).dtype)
        for p in ps:
            local[p.local.slices] = arrays[p.array][p.gbox.slices]
        out.append(local)
    return out


def merge(rule, locals_, n: int) -> dict[str, torch.Tensor]:
    shapes = global_shapes(rule, "a", tuple(locals_[0].shape), n)
    g = {k: torch.full(s, float("nan"), dtype=locals_[0].dtype) for k, s in shapes.items()}
    for r, local in enumerate(locals_):
        _, ps = pieces(rule, "a", shapes, n, r)
        for p in ps:
            g[p.array][p.gbox.slices] = local[p.local.slices]
    return g


def globals_for(rule, tail, dtype):
    return {"a" + s: torch.randn((length,) + tail).to(dtype) for s, length in rule.segments}


C = cfg()
D = dims(C)


@pytest.mark.parametrize("rule,tail", [(in_proj_rule(C), (H,)), (conv_rule(C), (1, 4)), (conv_rule(C), ())])
@pytest.mark.parametrize("n", [1, 2, 4])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_segment_rules_round_trip(rule, tail, n, dtype):
    g = globals_for(rule, tail, dtype)
    back = merge(rule, split_arrays(rule, g, n), n)
    assert sorted(back) == sorted(g)
    for k in g:
        assert raw_bytes(back[k]) == raw_bytes(g[k]), k


@pytest.mark.parametrize("rule,shape", [(COL, (NH,)), (COL, (D.d_inner,)), (ROW, (H, D.d_inner))])
@pytest.mark.parametrize("n", [1, 2, 4])
def test_per_head_and_out_proj_rules_round_trip(rule, shape, n):
    g = {"a": torch.randn(shape)}
    assert raw_bytes(merge(rule, split_arrays(rule, g, n), n)["a"]) == raw_bytes(g["a"])


@pytest.mark.parametrize("n", [1, 2, 4])
def test_in_proj_matches_hand_written_megatron_layout(n):
    # Independent expectation: rank r holds [z_r; x_r; B_r; C_r; dt_r], each the r-th of n equal row blocks.
    z, x = torch.randn(D.d_inner, H), torch.randn(D.d_inner, H)
    b, c, dt = torch.randn(NG * DS, H), torch.randn(NG * DS, H), torch.randn(NH, H)
    got = split_arrays(in_proj_rule(C), {"a.z": z, "a.x": x, "a.B": b, "a.C": c, "a.dt": dt}, n)
    for r in range(n):
        rows = lambda t: t[r * t.shape[0] // n:(r + 1) * t.shape[0] // n]  # noqa: E731
        want = torch.cat([rows(z), rows(x), rows(b), rows(c), rows(dt)])
        assert got[r].shape == (2 * D.d_inner // n + 2 * NG * DS // n + NH // n, H)
        assert raw_bytes(got[r]) == raw_bytes(want)
    if n > 1:  # negative control: a plain dim-0 split of the concatenation is a different layout
        whole = torch.cat([z, x, b, c, dt])
        assert raw_bytes(got[0]) != raw_bytes(whole.chunk(n)[0])


def test_conv1d_matches_hand_written_megatron_layout():
    n = 2
    x, b, c = torch.randn(D.d_inner, 1, 4), torch.randn(NG * DS, 1, 4), torch.randn(NG * DS, 1, 4)
    got = split_arrays(conv_rule(C), {"a.x": x, "a.B": b, "a.C": c}, n)
    for r in range(n):
        want = torch.cat([t.chunk(n)[r] for t in (x, b, c)])
        assert raw_bytes(got[r]) == raw_bytes(want)


def test_megatron_default_dims_without_num_heads():
    # mamba_num_heads unset: d_inner = 2 * hidden, heads = d_inner / head_dim (MambaMixer, expand 2).
    c = cfg(extra={"mamba_num_heads": None})
    d = dims(c)
    assert (d.nheads, d.d_inner) == (2 * H // HD, 2 * H)


# --- the layer pattern and the pipeline split -----------------------------------------------------------

def test_pattern_pipes_give_the_stage_chunks():
    fam = get_family("mamba")
    c = cfg("M*M|-M|M*|--")                    # 4 segments of 3, 2, 2, 2 layers
    r = fam.layer_ranges(c, parse_layout("tp1pp2vpp2"))["decoder"]
    # segment v*PP + p is chunk v of stage p; offsets = layers in earlier segments
    assert r == [[range(0, 3), range(5, 7)], [range(3, 5), range(7, 9)]]
    assert target_pattern(c, parse_layout("tp1pp2vpp2")) == "M*M|-M|M*|--"


def test_pattern_is_resegmented_for_another_pipeline():
    c = cfg("M*M-|M*M-")
    assert target_pattern(c, parse_layout("tp2pp1")) == "M*M-M*M-"
    assert target_pattern(c, parse_layout("tp1pp4")) == "M*|M-|M*|M-"
    assert target_pattern(c, parse_layout("tp1pp2vpp2")) == "M*|M-|M*|M-"
    plain = cfg("M*M-M*M-")
    assert target_pattern(plain, parse_layout("tp1pp4")) == "M*M-M*M-"      # no '|': Megatron splits evenly
    assert get_family("mamba").layer_ranges(plain, parse_layout("tp1pp4"))["decoder"] == [
        [range(0, 2)], [range(2, 4)], [range(4, 6)], [range(6, 8)]]


def test_layout_args_rewrite_the_pattern():
    fam = get_family("mamba")
    a = fam.layout_args({"hybrid_layer_pattern": "M*|M-", "num_layers_per_virtual_pipeline_stage": 2},
                        cfg("M*|M-"), parse_layout("tp4pp1"))
    assert a["hybrid_layer_pattern"] == "M*M-" and a["num_layers_per_virtual_pipeline_stage"] is None
    old = fam.layout_args({"hybrid_override_pattern": "M*M-"}, cfg("M*M-"), parse_layout("tp1pp2vpp2"))
    assert old["hybrid_override_pattern"] == "M|*|M|-"


@pytest.mark.parametrize("pattern,msg", [("M*G-", "gated delta net"), ("M*D-", "DSA"), ("M+M-", "MLA"),
                                         ("M*M-/MM", "MTP"), ("M*x-", "unknown layer symbol")])
def test_unpinned_or_unknown_symbols_are_refused(pattern, msg):
    c = cfg("M*M-", extra={"hybrid_layer_pattern": pattern})
    with pytest.raises(BadInput, match=msg):
        get_family("mamba").validate(c, parse_layout("tp1pp1"))


def test_pattern_length_must_match_num_layers():
    with pytest.raises(BadInput, match="has 4 layers, args say num_layers = 6"):
        get_family("mamba").validate(cfg("M*M-", num_layers=6), parse_layout("tp1pp1"))


@pytest.mark.parametrize("layout,c,msg", [
    ("tp8pp1", cfg(groups=4), "mamba groups = 4 is not divisible by TP = 8"),
    ("tp16pp1", cfg(groups=16, heads=16, extra={}), "mamba heads|attention heads"),
    ("tp2pp1", cfg(groups=3, heads=9), "mamba heads = 9 is not divisible by TP = 2"),
    ("tp1pp3", cfg(), "do not divide"),
    ("tp1pp1ep2", cfg(), "no experts"),
])
def test_validation_refuses_layouts(layout, c, msg):
    with pytest.raises((LayoutError, BadInput), match=msg):
        get_family("mamba").validate(c, parse_layout(layout))


def test_detect_family_from_new_and_old_pattern_args():
    assert detect_family(["decoder.layers.0.mlp.linear_fc1.weight"], {"hybrid_layer_pattern": "-"}) == "mamba"
    assert detect_family(["decoder.layers.0.mlp.linear_fc1.weight"], {"hybrid_override_pattern": "-"}) == "mamba"
    assert detect_family(["decoder.layers.0.mixer.in_proj.weight"], {}) == "mamba"


# --- planner: key placement, both conv1d spellings -----------------------------------------------------

def _inventory(fam, c, keys_rename=None):
    keys = fam.global_keys(c)
    out = []
    for k, s in keys:
        if keys_rename:
            k = keys_rename(k)
        out.append((k, s, None if s is None else "float32"))
    return [Inventory(FileCoord(0, 0), "mp_rank_00", {"model": out})]


@pytest.mark.parametrize("name", ["conv1d_weight", "conv1d.weight"])
def test_both_conv1d_spellings_are_read_and_the_source_spelling_is_written(name):
    fam = get_family("mamba")
    c = cfg()
    rename = (lambda k: k.replace("conv1d_weight", "conv1d.weight").replace("conv1d_bias", "conv1d.bias")) \
        if name == "conv1d.weight" else None
    src = plan_source(fam, c, Layout(), _inventory(fam, c, rename))
    assert f"model/decoder.layers.0.mixer.{name}.B" in src.arrays
    assert src.arrays["model/decoder.layers.0.mixer.in_proj.weight.dt"]["shape"] == [NH, H]
    files = plan_target(fam, c, parse_layout("tp2pp2"), src.manifest, src.arrays, set())
    keys = {t.key for f in files for t in f.tensors}
    assert f"decoder.layers.0.mixer.{name}" in keys and "decoder.layers.1.mlp.linear_fc1.weight" in keys
    other = "conv1d.weight" if name == "conv1d_weight" else "conv1d_weight"
    assert not any(other in k for k in keys)


def test_a_mamba_tensor_on_an_attention_layer_is_refused():
    fam = get_family("mamba")
    c = cfg()
    inv = _inventory(fam, c, lambda k: k.replace("layers.0.mixer", "layers.1.mixer"))
    with pytest.raises(BadInput, match=r"layer 1 is '\*' in the hybrid pattern"):
        plan_source(fam, c, Layout(), inv)


def test_in_proj_of_the_wrong_size_names_the_tensor():
    fam = get_family("mamba")
    c = cfg()
    keys = [(k, (s[0] - 4, s[1]) if k.endswith("layers.0.mixer.in_proj.weight") else s, "float32")
            for k, s in fam.global_keys(c)]
    with pytest.raises(BadInput, match="in_proj.weight"):
        plan_source(fam, c, Layout(), [Inventory(FileCoord(0, 0), "mp_rank_00", {"model": keys})])


# --- CLI end to end -----------------------------------------------------------------------------------

def test_cli_tp2pp1_to_tp1pp2_is_bitwise_and_in_proj_is_regrouped(cli, tmp_path):
    src, dst = tmp_path / "s", tmp_path / "d"
    assert cli("example", "mamba", "--layout", "tp2pp1", "--out", src, "--mamba-groups", "2").code == 0
    r = cli("convert", src, dst, "--to", "tp1pp2", "--nproc", "0")
    assert r.code == 0, r.err
    assert cli("verify", src, dst).code == 0
    s0, s1 = (load(p) for p in rank_files(src))
    d0 = load(rank_files(dst)[0])
    assert d0["args"].hybrid_layer_pattern == "M*M-" + "M*M-" and d0["args"].pipeline_model_parallel_size == 2
    # Independent expectation: the TP1 in_proj is each segment's two TP2 halves side by side.
    di, bc, nh = 8 * 8, 2 * 16, 8                     # example defaults: 8 heads of 8, 2 groups x state 16
    sizes = [di // 2, di // 2, bc // 2, bc // 2, nh // 2]
    key = "decoder.layers.0.mixer.in_proj.weight"
    parts0 = s0["model"][key].split(sizes)
    parts1 = s1["model"][key].split(sizes)
    want = torch.cat([torch.cat([a, b]) for a, b in zip(parts0, parts1)])
    assert raw_bytes(d0["model"][key]) == raw_bytes(want)
    assert raw_bytes(d0["model"][key]) != raw_bytes(torch.cat([s0["model"][key], s1["model"][key]]))
    conv = "decoder.layers.0.mixer.conv1d_weight"
    c0, c1 = s0["model"][conv].split(sizes[1:4]), s1["model"][conv].split(sizes[1:4])
    assert raw_bytes(d0["model"][conv]) == raw_bytes(torch.cat([torch.cat([a, b]) for a, b in zip(c0, c1)]))
    # the last stage holds layers 4..7 renumbered 0..3, with the final norm and the output layer
    d1 = load(rank_files(dst)[1])["model"]
    assert raw_bytes(d1["decoder.layers.0.mixer.A_log"]) == raw_bytes(
        torch.cat([s0["model"]["decoder.layers.4.mixer.A_log"], s1["model"]["decoder.layers.4.mixer.A_log"]]))
    assert "decoder.final_norm.weight" in d1 and "decoder.final_norm.weight" not in d0["model"]


def test_cli_hybrid_with_moe_layers_changes_ep_and_tp(cli, tmp_path):
    src, dst = tmp_path / "s", tmp_path / "d"
    r = cli("example", "mamba", "--layout", "tp1pp1ep2", "--out", src, "--layers", "4", "--pattern", "M*-E",
            "--experts", "4", "--moe-ffn", "32", "--grouped", "--optimizer", "none")
    assert r.code == 0, r.err
    assert cli("convert", src, dst, "--to", "tp2pp2", "--nproc", "0").code == 0
    assert cli("verify", src, dst).code == 0
    keys = set(load(rank_files(dst)[-1])["model"])
    assert "decoder.layers.1.mlp.experts.linear_fc1.weight3" in keys      # global layer 3, 'E'


def test_cli_refuses_tp8_with_four_groups_before_writing(cli, tmp_path):
    src = tmp_path / "s"
    assert cli("example", "mamba", "--layout", "tp1pp1", "--out", src, "--mamba-groups", "4").code == 0
    r = cli("convert", src, tmp_path / "d", "--to", "tp8pp1", "--nproc", "0")
    assert r.code == 2 and "mamba groups = 4 is not divisible by TP = 8" in r.err
    assert not (tmp_path / "d").exists()
