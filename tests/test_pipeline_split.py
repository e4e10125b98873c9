"""Target pipeline splits: stage ranges against hand-written expectations and against megatron-core's own
offset arithmetic (get_transformer_layer_offset / get_num_layers_to_build, no launch), the args written,
the choice of the target's split, and split -> merge round trips through `convert`."""
from __future__ import annotations

import random

import pytest
import torch

from ckptctl.errors import LayoutError
from ckptctl.layout import Layout, stage_layers
from ckptctl.models import get_family
from ckptctl.models.config import ModelConfig
from ckptctl.pipeline import PipelineSplit, layout_ranges, parse_stages, resolve_target, with_options, with_split_args
from conftest import load, rank_files, raw_bytes


def starts(ranges):
    return [[(r.start, r.stop) for r in row] for row in ranges]


# --- hand-written expectations ------------------------------------------------------------------------

def test_61_layers_3_4x14_2_over_pp16():
    got = stage_layers(61, Layout(pp=16), first=3, last=2)
    assert got[0] == [range(0, 3)] and got[15] == [range(59, 61)]
    assert [r[0] for r in got[1:15]] == [range(3 + 4 * i, 7 + 4 * i) for i in range(14)]


def test_61_layers_7_8x6_6_over_pp8():
    got = stage_layers(61, Layout(pp=8), first=7, last=6)
    assert starts(got) == [[(0, 7)], [(7, 15)], [(15, 23)], [(23, 31)], [(31, 39)], [(39, 47)], [(47, 55)], [(55, 61)]]


def test_uneven_with_vpp():
    # counts 4, 4, 2 over VPP 2 -> 2, 2, 1 per chunk; chunk 1 starts after all of chunk 0 (5 layers)
    assert starts(stage_layers(10, Layout(pp=3, vpp=2), first=4, last=2)) == [
        [(0, 2), (5, 7)], [(2, 4), (7, 9)], [(4, 5), (9, 10)]]


def test_only_first_or_only_last():
    assert starts(stage_layers(7, Layout(pp=3), first=1)) == [[(0, 1)], [(1, 4)], [(4, 7)]]
    assert starts(stage_layers(7, Layout(pp=3), last=3)) == [[(0, 2)], [(2, 4)], [(4, 7)]]


def test_explicit_layout_string():
    assert parse_stages("Et*3|(tt|)*2,ttL") == ["Ettt", "tt", "tt", "ttL"]
    assert starts(layout_ranges("Et*3|(tt|)*2,ttL", 9, 4, 1)) == [[(0, 3)], [(3, 5)], [(5, 7)], [(7, 9)]]
    # stage v*PP + p is chunk v of rank p; an empty stage holds no layer
    assert starts(layout_ranges("Ett||tt|ttL", 6, 2, 2)) == [[(0, 2), (2, 4)], [(2, 2), (4, 6)]]


@pytest.mark.parametrize("bad,match", [
    ("Ett|ttL", "has 2 stages but PP\\*VPP"), ("tt|EttL", "embedding"), ("Ett|tt", "loss"),
    ("Ett|ttmL", "MTP"), ("Ett|tttL", "places 5"), ("Ext|ttL", "unknown layer"),
])
def test_bad_layout_strings(bad, match):
    with pytest.raises(LayoutError, match=match):
        layout_ranges(bad, 4, 4 if bad == "Ett|ttL" else 2, 1)


@pytest.mark.parametrize("L,pp,vpp,first,last", [(61, 8, 1, 3, 2), (8, 1, 1, 3, 2), (8, 4, 2, 3, None), (6, 2, 1, 7, None)])
def test_illegal_splits_are_refused(L, pp, vpp, first, last):
    with pytest.raises(LayoutError):
        stage_layers(L, Layout(pp=pp, vpp=vpp), first=first, last=last)


def test_split_values_are_checked():
    with pytest.raises(LayoutError, match="positive"):
        PipelineSplit(first=0)
    with pytest.raises(LayoutError, match="cannot be combined"):
        PipelineSplit(first=2, layout="Ett|ttL")


# --- megatron-core's own arithmetic as the judge ----------------------------------------------------

def _mcore_ranges(L, pp, vpp, first, last, layout):
    pytest.importorskip("megatron.core")
    import megatron.core.parallel_state as ps
    from megatron.core.transformer.transformer_block import get_num_layers_to_build
    from megatron.core.transformer.transformer_config import TransformerConfig
    from megatron.core.transformer.transformer_layer import get_transformer_layer_offset
    c = TransformerConfig(num_layers=L, hidden_size=8, num_attention_heads=1, pipeline_model_parallel_size=pp,
                          virtual_pipeline_model_parallel_size=vpp if vpp > 1 else None,
                          num_layers_in_first_pipeline_stage=first, num_layers_in_last_pipeline_stage=last,
                          pipeline_model_parallel_layout=layout, pipeline_dtype=torch.float32)
    v = c.virtual_pipeline_model_parallel_size
    out = []
    saved = ps.get_pipeline_model_parallel_rank, ps.get_virtual_pipeline_model_parallel_world_size
    try:
        ps.get_virtual_pipeline_model_parallel_world_size = lambda: v   # the layout path asks parallel_state
        for p in range(pp):
            ps.get_pipeline_model_parallel_rank = lambda: p
            row = []
            for s in range(v or 1):
                o = get_transformer_layer_offset(c, s if v else None, p)
                row.append(range(o, o + get_num_layers_to_build(c, s if v else None, p)))
            out.append(row)
    finally:
        ps.get_pipeline_model_parallel_rank, ps.get_virtual_pipeline_model_parallel_world_size = saved
    return out


def _legal_splits(seed: int, n: int):
    rnd, out = random.Random(seed), []
    while len(out) < n:
        pp, vpp = rnd.choice([2, 3, 4, 8, 16]), rnd.choice([1, 1, 2])
        mid = rnd.randint(1, 4) * vpp
        first = rnd.choice([None, rnd.randint(1, 6) * vpp])
        last = rnd.choice([None, rnd.randint(1, 6) * vpp])
        nmid = pp - (first is not None) - (last is not None)
        if nmid < 0 or (first is None and last is None):
            continue
        out.append((mid * nmid + (first or 0) + (last or 0), pp, vpp, first, last, None))
    for pp, vpp, per in [(4, 1, [3, 2, 2, 1]), (2, 2, [2, 0, 3, 1]), (4, 2, [1, 2, 2, 2, 2, 2, 2, 1])]:
        stages = ["t" * k for k in per]
        stages[0], stages[-1] = "E" + stages[0], stages[-1] + "L"
        out.append((sum(per), pp, vpp, None, None, "|".join(stages)))
    return out


@pytest.mark.mcore
@pytest.mark.parametrize("L,pp,vpp,first,last,layout", _legal_splits(16, 40))
def test_stage_ranges_equal_megatron_core(L, pp, vpp, first, last, layout):
    try:
        theirs = _mcore_ranges(L, pp, vpp, first, last, layout)
    except ZeroDivisionError:       # VPP with no middle stage: megatron-core cannot place it, nor do we
        with pytest.raises(LayoutError, match="no middle stage"):
            stage_layers(L, Layout(pp=pp, vpp=vpp), first, last, layout)
        return
    assert stage_layers(L, Layout(pp=pp, vpp=vpp), first, last, layout) == theirs


# --- choosing the target's split and writing it into args ----------------------------------------------

CFG = ModelConfig(family="gpt", num_layers=61, hidden=8, heads=2, groups=2, kv_channels=4, ffn=16, glu=False,
                  tied=False, padded_vocab=128, true_vocab=128, vocab_divisor=128,
                  first_stage_layers=3, last_stage_layers=2)
GPT = get_family("gpt")


def test_source_split_does_not_fit_pp8_and_the_error_names_the_options():
    with pytest.raises(LayoutError, match="decoder-first-pipeline-num-layers"):
        resolve_target(GPT, CFG, Layout(pp=8))


def test_target_split_given_for_pp8():
    to = resolve_target(GPT, CFG, with_options(Layout(pp=8), 7, 6, None))
    assert GPT.layer_ranges(CFG, to)["decoder"][1] == [range(7, 15)]
    to = resolve_target(GPT, CFG, with_options(Layout(pp=8), None, None, "Et*5|(t*8|)*6,t*8L"))
    assert GPT.layer_ranges(CFG, to)["decoder"][0] == [range(0, 5)]


def test_source_split_kept_when_it_fits_and_dropped_at_pp1():
    assert resolve_target(GPT, CFG, Layout(pp=16, tp=2)).split is None          # args keep the source's
    assert resolve_target(GPT, CFG, Layout(tp=2)).split == PipelineSplit()      # one stage: no split
    assert with_options(Layout(pp=2), 0, 0, None).split == PipelineSplit()     # 0 = unset: even


def test_args_carry_the_target_split():
    args = {"decoder_first_pipeline_num_layers": 3, "decoder_last_pipeline_num_layers": 2,
            "num_layers_in_first_pipeline_stage": 3, "num_layers_per_virtual_pipeline_stage": None}
    assert with_split_args(args, Layout(pp=16)) is args
    a = with_split_args(args, Layout(pp=8, split=PipelineSplit(7, 6)))
    assert (a["decoder_first_pipeline_num_layers"], a["decoder_last_pipeline_num_layers"],
            a["num_layers_in_first_pipeline_stage"], a["pipeline_model_parallel_layout"]) == (7, 6, 7, None)
    b = with_split_args(args, Layout(pp=4, split=PipelineSplit(layout="Ett|tt|tt|ttL")))
    assert b["pipeline_model_parallel_layout"] == "Ett|tt|tt|ttL" and b["decoder_first_pipeline_num_layers"] is None
    import ckptctl.formats.megatron as megatron
    assert megatron.rewrite_args(args, Layout(pp=8, split=PipelineSplit(7, 6)), 128, 61)["decoder_last_pipeline_num_layers"] == 6


def test_layout_json_round_trip_keeps_the_split():
    lay = Layout(tp=2, pp=4, split=PipelineSplit(1, 3))
    assert Layout.from_json(lay.to_json()) == lay and "split" not in Layout(tp=2).to_json()


def test_split_read_from_args():
    from ckptctl.models.config import config_from_args
    base = {"num_layers": 8, "hidden_size": 8, "num_attention_heads": 2}
    c = config_from_args({**base, "num_layers_in_first_pipeline_stage": 2}, "gpt")
    assert (c.first_stage_layers, c.last_stage_layers) == (2, None)
    c = config_from_args({**base, "pipeline_model_parallel_layout": [["embedding", "decoder"], ["decoder"] * 7 + ["loss"]]}, "gpt")
    assert c.extra["pipeline_model_parallel_layout"] == "Et|tttttttL"


# --- split -> merge round trips through convert ----------------------------------------------------------

@pytest.fixture(scope="module")
def uneven_src(tmp_path_factory):
    """A 6-layer GPT at PP 4 with 1 layer on the first stage and 1 on the last (2 middle stages of 2)."""
    from ckptctl.example import example
    out = tmp_path_factory.mktemp("split") / "src"
    example("gpt", Layout(tp=2, pp=4, split=PipelineSplit(1, 1)), out,
            {"layers": 6, "hidden": 16, "heads": 4, "ffn": 32, "vocab": 100, "swiglu": True}, optimizer="adam")
    return out


def _tensors(root):
    return {(f.parent.name, c, k): raw_bytes(v) for f in rank_files(root) for c, sd in load(f).items()
            if c.startswith("model") for k, v in sd.items() if torch.is_tensor(v)}


def test_uneven_source_on_disk(uneven_src):
    files = {f.parent.name: load(f) for f in rank_files(uneven_src)}
    assert files["mp_rank_00_000"]["args"].decoder_first_pipeline_num_layers == 1
    layers = {n: sorted({k.split(".")[2] for k in sd["model"] if k.startswith("decoder.layers.")}) for n, sd in files.items()}
    assert layers["mp_rank_00_000"] == ["0"] and layers["mp_rank_00_001"] == ["0", "1"] and layers["mp_rank_00_003"] == ["0"]


def test_split_to_other_split_and_back(uneven_src, tmp_path, cli):
    # PP4 (1, 2, 2, 1 layers) -> PP3 (3, 2, 1) -> PP4 (1, 2, 2, 1)
    r = cli("convert", uneven_src, tmp_path / "b", "--to", "tp1pp3", "--decoder-first-pipeline-num-layers", "3",
            "--decoder-last-pipeline-num-layers", "1", "--nproc", "0", "--json")
    assert r.code == 0, r.out + r.err
    b = {f.parent.name: load(f) for f in rank_files(tmp_path / "b")}
    assert sorted(b) == ["mp_rank_00_000", "mp_rank_00_001", "mp_rank_00_002"]
    assert b["mp_rank_00_002"]["args"].decoder_last_pipeline_num_layers == 1
    assert sorted(k for k in b["mp_rank_00_000"]["model"] if k.endswith("input_layernorm.weight")) == [
        f"decoder.layers.{i}.input_layernorm.weight" for i in range(3)]
    # layer 3 of the source (middle stage 1, local 0 on PP4 rank 2 is global 3) is local 0 of PP3 rank 1
    src = load(uneven_src / "iter_0000010/mp_rank_00_002/model_optim_rng.pt")["model"]
    assert raw_bytes(b["mp_rank_00_001"]["model"]["decoder.layers.0.pre_mlp_layernorm.weight"]) == raw_bytes(
        src["decoder.layers.0.pre_mlp_layernorm.weight"])
    v = cli("verify", uneven_src, tmp_path / "b", "--json")
    assert v.code == 0, v.out
    assert cli("convert", tmp_path / "b", tmp_path / "a", "--to", "tp2pp4", "--decoder-first-pipeline-num-layers",
               "1", "--decoder-last-pipeline-num-layers", "1", "--nproc", "0").code == 0
    assert _tensors(tmp_path / "a") == _tensors(uneven_src)
    assert all(load(f)["args"].decoder_first_pipeline_num_layers == 1 for f in rank_files(tmp_path / "a"))


def test_merge_to_pp1_drops_the_split_and_a_misfit_is_exit_2(uneven_src, tmp_path, cli):
    assert cli("convert", uneven_src, tmp_path / "one", "--to", "tp1pp1", "--nproc", "0").code == 0
    sd = load(next(iter(rank_files(tmp_path / "one"))))
    assert sd["args"].decoder_first_pipeline_num_layers is None and len(
        [k for k in sd["model"] if k.endswith("input_layernorm.weight")]) == 6
    assert cli("verify", uneven_src, tmp_path / "one").code == 0
    r = cli("convert", uneven_src, tmp_path / "x", "--to", "tp1pp5", "--nproc", "0")
    assert r.code == 2 and "decoder-first-pipeline-num-layers" in (r.out + r.err)
    assert not (tmp_path / "x").exists()
