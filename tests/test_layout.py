import pytest

from ckptctl.errors import LayoutError
from ckptctl.layout import Layout, parse_layout, stage_layers


@pytest.mark.parametrize("text,expect", [
    ("tp2pp4", Layout(tp=2, pp=4)),
    ("tp2pp2vpp2", Layout(tp=2, pp=2, vpp=2)),
    ("tp1pp1dp4", Layout(dp=4)),
    ("tp2pp1ep4etp1", Layout(tp=2, ep=4, etp=1)),
    ("pp2", Layout(pp=2)),
    ("TP4", Layout(tp=4)),
])
def test_parse(text, expect):
    assert parse_layout(text) == expect


def test_etp_defaults_to_tp():
    assert parse_layout("tp4pp1ep2").expert_tp == 4
    assert parse_layout("tp4pp1ep2etp1").expert_tp == 1


@pytest.mark.parametrize("bad", ["tp", "pp2pp2", "tp2tp2", "tp0", "x", "tp2pp2 vpp2", "tp2-pp2"])
def test_parse_rejects(bad):
    with pytest.raises(LayoutError):
        parse_layout(bad)


def test_overrides_win():
    assert parse_layout("tp2pp2", pp=4) == Layout(tp=2, pp=4)


def test_str_round_trip():
    for s in ["tp2pp4", "tp1pp4vpp2", "tp2pp1ep4etp1", "tp1pp1dp4"]:
        assert str(parse_layout(s)) == s


def test_dense_model_files_and_names():
    lay = Layout(tp=2, pp=2, dp=2)
    names = [f.dirname(lay) for f in lay.model_files]
    assert names == ["mp_rank_00_000", "mp_rank_01_000", "mp_rank_00_001", "mp_rank_01_001"]
    assert [f.dirname(Layout(tp=4)) for f in Layout(tp=4).model_files] == [f"mp_rank_0{i}" for i in range(4)]


def test_rank_grid_order_tp_fastest():
    lay = Layout(tp=2, pp=2, dp=2)
    # rank = tp + TP*(dp + DP*pp)
    assert [lay.dense_coords(r) for r in range(8)] == [
        (0, 0, 0), (1, 0, 0), (0, 1, 0), (1, 1, 0), (0, 0, 1), (1, 0, 1), (0, 1, 1), (1, 1, 1)]


def test_even_stage_layers():
    assert stage_layers(8, Layout(pp=4)) == [[range(0, 2)], [range(2, 4)], [range(4, 6)], [range(6, 8)]]


def test_vpp_stage_layers_follow_megatron_formula():
    # chunk v on stage p holds L/(PP*VPP) layers starting at v*L/VPP + p*L/(PP*VPP)
    L, pp, vpp = 16, 4, 2
    got = stage_layers(L, Layout(pp=pp, vpp=vpp))
    for p in range(pp):
        for v in range(vpp):
            start = v * L // vpp + p * L // (pp * vpp)
            assert got[p][v] == range(start, start + L // (pp * vpp))


def test_uneven_first_last():
    got = stage_layers(10, Layout(pp=4), first=1, last=3)
    assert [r[0] for r in got] == [range(0, 1), range(1, 4), range(4, 7), range(7, 10)]


def test_layers_must_divide():
    with pytest.raises(LayoutError, match="do not divide"):
        stage_layers(6, Layout(pp=4))
