"""MoE family: expert key grammar, expert numbering, ETP splits with GLU, legacy file sets, validation,
and end-to-end conversions checked against independently sliced expectations."""
from __future__ import annotations

import pytest
import torch

from ckptctl.box import Box
from ckptctl.errors import LayoutError
from ckptctl.layout import FileCoord, Layout, parse_layout
from ckptctl.models import detect_family, get_family
from ckptctl.models.base import KeyLoc
from ckptctl.models.config import ModelConfig
from ckptctl.models.rules import pieces
from ckptctl.reshard.plan import Inventory, Namer, plan_source
from tests.conftest import load, raw_bytes

MOE = get_family("moe")


def cfg(**kw) -> ModelConfig:
    base = dict(family="moe", num_layers=2, hidden=16, heads=4, groups=4, kv_channels=4, ffn=32, glu=False,
                tied=False, padded_vocab=128, true_vocab=128, vocab_divisor=128, num_experts=8, moe_ffn=16,
                extra={"add_bias_linear": False})
    base.update(kw)
    return ModelConfig(**base)


# --- key grammar ---------------------------------------------------------------------------------

@pytest.mark.parametrize("rest,expected", [
    ("mlp.experts.local_experts.3.linear_fc1.weight", ("mlp.experts.local_experts.{e}.linear_fc1.weight", 3)),
    ("mlp.experts.local_experts.12.linear_fc2._extra_state", ("mlp.experts.local_experts.{e}.linear_fc2._extra_state", 12)),
    ("mlp.experts.linear_fc1.weight7", ("mlp.experts.linear_fc1.weight{e}", 7)),
    ("mlp.experts.linear_fc2.bias15", ("mlp.experts.linear_fc2.bias{e}", 15)),
    ("mlp.experts.linear_fc1._extra_state", None),
    ("mlp.shared_experts.linear_fc1.weight", None),
    ("mlp.router.weight", None),
])
def test_expert_key_parsing(rest, expected):
    assert MOE.expert_of(rest) == expected


def test_both_expert_layouts_share_one_store_array():
    assert MOE.expert_array("mlp.experts.local_experts.{e}.linear_fc1.weight") == "mlp.experts.linear_fc1.weight"
    assert MOE.expert_array("mlp.experts.linear_fc1.weight{e}") == "mlp.experts.linear_fc1.weight"
    assert MOE.expert_array("mlp.experts.linear_fc2.bias{e}") == "mlp.experts.linear_fc2.bias"


def test_detect_family():
    assert detect_family(["decoder.layers.0.mlp.experts.linear_fc1.weight0"], {}) == "moe"
    assert detect_family(["decoder.layers.0.mlp.router.weight"], {}) == "moe"
    assert detect_family(["decoder.layers.0.mlp.linear_fc1.weight"], {"num_experts": 4}) == "moe"
    assert detect_family(["decoder.layers.0.mlp.linear_fc1.weight"], {}) == "gpt"


def test_single_grouped_weights_are_refused():
    with pytest.raises(Exception, match="GroupedMLP"):
        MOE.locate("decoder.layers.0.mlp.experts.weight1")
    with pytest.raises(Exception, match="single grouped"):
        MOE.locate("decoder.layers.0.mlp.experts.linear_fc1.weight")


# --- expert numbering: g = e*E/EP + j --------------------------------------------------------------

@pytest.mark.parametrize("ep,e,j,g", [(4, 2, 1, 5), (2, 1, 3, 7), (8, 7, 0, 7), (1, 0, 6, 6)])
def test_global_expert_number(ep, e, j, g):
    namer = Namer(MOE, cfg(), Layout(ep=ep))
    key = f"decoder.layers.1.mlp.experts.local_experts.{j}.linear_fc2.weight"
    gkey, _, expert = namer.globalize(FileCoord(0, 0, ep=e), 0, key, "f")
    assert expert == g
    assert gkey == f"decoder.layers.1.mlp.experts.local_experts.{g}.linear_fc2.weight"
    gkey, _, expert = namer.globalize(FileCoord(0, 0, ep=e), 0, f"decoder.layers.0.mlp.experts.linear_fc1.weight{j}", "f")
    assert (gkey, expert) == (f"decoder.layers.0.mlp.experts.linear_fc1.weight{g}", g)


def test_local_expert_beyond_the_rank_is_refused():
    namer = Namer(MOE, cfg(), Layout(ep=4))   # 2 experts per EP rank
    with pytest.raises(Exception, match="local expert 2"):
        namer.globalize(FileCoord(0, 0, ep=1), 0, "decoder.layers.0.mlp.experts.local_experts.2.linear_fc1.weight", "f")


# --- ETP splits with GLU: split -> merge round trip and an independent expectation -----------------

@pytest.mark.parametrize("glu", [False, True])
@pytest.mark.parametrize("etp", [1, 2, 4])
def test_expert_fc1_split_round_trip(glu, etp):
    c = cfg(glu=glu)
    Fe, H, E = 16, 16, 8
    rows = (2 if glu else 1) * Fe
    rule = MOE.rule(KeyLoc("layer", "decoder", 0, "mlp.experts.linear_fc1.weight"), c)
    assert rule.group == "etp"
    full = torch.randn(E, rows, H)
    shapes = {"a": (E, rows, H)}
    merged = torch.full_like(full, float("nan"))
    for g in (0, 5):
        for r in range(etp):
            lshape, ps = pieces(rule, "a", shapes, etp, r, expert=g)
            assert lshape == (rows // etp, H)
            local = torch.empty(lshape)
            for p in ps:
                local[p.local.slices] = full[p.gbox.slices].reshape(p.local.sizes)
            # independent expectation: GLU keeps [W_r; V_r], W = rows [0, Fe), V = rows [Fe, 2Fe)
            n = Fe // etp
            if glu:
                want = torch.cat([full[g, r * n:(r + 1) * n], full[g, Fe + r * n:Fe + (r + 1) * n]])
            else:
                want = full[g, r * n:(r + 1) * n]
            assert raw_bytes(local) == raw_bytes(want)
            for p in ps:
                merged[p.gbox.slices] = local[p.local.slices].reshape(p.gbox.sizes)
        assert raw_bytes(merged[g]) == raw_bytes(full[g])


def test_expert_fc2_splits_columns_over_etp_and_bias_is_replicated():
    loc = KeyLoc
    c = cfg()
    fc2 = MOE.rule(loc("layer", "decoder", 0, "mlp.experts.linear_fc2.weight"), c)
    assert (fc2.kind, fc2.dim, fc2.group) == ("split", 1, "etp")
    full = torch.randn(8, 16, 16)
    lshape, ps = pieces(fc2, "a", {"a": (8, 16, 16)}, 4, 3, expert=6)
    assert lshape == (16, 4)
    assert ps[0].gbox == Box((6, 0, 12), (1, 16, 4))
    for k in ("mlp.experts.linear_fc2.bias", "mlp.router.weight", "mlp.router.expert_bias",
              "mlp.shared_experts.gate_weight", "pre_mlp_layernorm.weight"):
        assert MOE.rule(loc("layer", "decoder", 0, k), c).kind == "replicated", k
    shared = MOE.rule(loc("layer", "decoder", 0, "mlp.shared_experts.linear_fc1.weight"), cfg(glu=True))
    assert (shared.kind, shared.group) == ("segments", "tp")


# --- legacy file sets (DESIGN §2) ----------------------------------------------------------------

@pytest.mark.parametrize("layout,dirs", [
    (Layout(tp=4, ep=2, etp=2, dp=2), [("mp_rank_00_000", 0), ("mp_rank_01_000", 1), ("mp_rank_02_001", 0), ("mp_rank_03_001", 1)]),
    (Layout(tp=2, ep=2, etp=1), [("mp_rank_00_000", 0), ("mp_rank_01_001", 0)]),
    (Layout(tp=1, ep=4), [(f"mp_rank_00_00{e}", 0) for e in range(4)]),
    (Layout(tp=2, ep=2, etp=2), [("mp_rank_00_000", 0), ("mp_rank_01_000", 1), ("mp_rank_00_001", 0), ("mp_rank_01_001", 1)]),
    (Layout(tp=2, pp=2, ep=2), [("mp_rank_00_000_000", 0), ("mp_rank_01_000_000", 1), ("mp_rank_00_000_001", 0),
                                ("mp_rank_01_000_001", 1), ("mp_rank_00_001_000", 0), ("mp_rank_01_001_000", 1),
                                ("mp_rank_00_001_001", 0), ("mp_rank_01_001_001", 1)]),
])
def test_legacy_file_set(layout, dirs):
    got = sorted((fc.dirname(layout), fc.etp) for fc in layout.model_files)
    assert got == sorted(dirs)


@pytest.mark.parametrize("text", ["tp1pp4ep1etp2", "tp2pp1ep4etp4"])
def test_etp_above_tp_is_not_representable(text):
    with pytest.raises(LayoutError, match="not representable"):
        parse_layout(text).model_files


# --- validation --------------------------------------------------------------------------------

@pytest.mark.parametrize("c,layout,msg", [
    (cfg(), "tp1pp1ep3", "number of experts"),
    (cfg(moe_ffn=18), "tp1pp1ep2etp4", "expert FFN hidden size"),
    (cfg(extra={"add_bias_linear": True}), "tp2pp1ep2etp2", "biases"),
    (cfg(extra={"add_bias_linear": False, "moe_shared_expert_intermediate_size": 10}), "tp4pp1", "shared expert"),
    (cfg(num_experts=0), "tp1pp1", "no experts"),
])
def test_validate_refuses(c, layout, msg):
    with pytest.raises(LayoutError, match=msg):
        MOE.validate(c, parse_layout(layout))


def test_bias_with_etp1_is_fine():
    MOE.validate(cfg(extra={"add_bias_linear": True}), parse_layout("tp2pp1ep2etp1"))


@pytest.mark.parametrize("layout", ["tp1pp1ep2", "tp2pp1ep1etp1"])
def test_dense_model_refuses_expert_layouts(layout):
    gpt = get_family("gpt")
    with pytest.raises(LayoutError, match="dense -> MoE"):
        gpt.validate(cfg(family="gpt", num_experts=0), parse_layout(layout))


# --- grouped _extra_state follows its (EP, ETP) shard ---------------------------------------------

def test_grouped_extra_state_slots_are_per_ep_and_etp_rank():
    c = cfg()
    lay = parse_layout("tp2pp1ep2etp2")
    invs = []
    for fc in lay.model_files:
        entries = [(f"decoder.layers.0.mlp.experts.linear_fc1.weight{j}", (8, 16), "float32") for j in range(4)]
        entries.append(("decoder.layers.0.mlp.experts.linear_fc1._extra_state", None, None))
        invs.append(Inventory(fc, fc.dirname(lay), {"model": entries}))
    one = cfg(num_layers=1)
    plan = plan_source(MOE, one, lay, invs)
    slots = sorted(plan.slots)
    assert len(slots) == 4 and len(set(plan.slots.values())) == 4
    assert "decoder.layers.0.mlp.experts.linear_fc1._extra_state|2x2|1x0" in slots


# --- end to end (CLI), expectations from the source files -----------------------------------------

def _file(root, name):
    return load(next(root.glob(f"iter_*/{name}/model_optim_rng.pt")))["model"]


@pytest.mark.parametrize("grouped", [False, True])
def test_cli_example_convert_verify(cli, tmp_path, grouped):
    """The acceptance case: example moe tp1pp1ep4 -> convert tp2pp1ep2etp2 -> verify."""
    s, d = tmp_path / "s", tmp_path / "d"
    opts = ["--swiglu", "--layers", "2"] + (["--grouped"] if grouped else [])
    r = cli("example", "moe", "--layout", "tp1pp1ep4", "--out", s, *opts)
    assert r.code == 0, r.out + r.err
    assert sorted(p.name for p in s.glob("iter_*/mp_rank_*")) == [f"mp_rank_00_00{e}" for e in range(4)]
    r = cli("convert", s, d, "--to", "tp2pp1ep2etp2", "--nproc", "0")
    assert r.code == 0, r.out + r.err
    assert sorted(p.name for p in d.glob("iter_*/mp_rank_*")) == ["mp_rank_00_000", "mp_rank_00_001",
                                                                  "mp_rank_01_000", "mp_rank_01_001"]
    assert cli("verify", s, d).code == 0
    # Independent expectation: target file (tp1, ep1) = ETP rank 1 of global experts 4..7. Global expert 5
    # lives in source file ep2 (2 per rank) as local 1; fc1 is [W; V] (2*64 rows), fc2 (H, 64).
    src = _file(s, "mp_rank_00_002")
    dst = _file(d, "mp_rank_01_001")
    if grouped:
        w1, w2 = "decoder.layers.1.mlp.experts.linear_fc1.weight{}", "decoder.layers.1.mlp.experts.linear_fc2.weight{}"
    else:
        w1 = "decoder.layers.1.mlp.experts.local_experts.{}.linear_fc1.weight"
        w2 = "decoder.layers.1.mlp.experts.local_experts.{}.linear_fc2.weight"
    fc1, fc2 = src[w1.format(1)], src[w2.format(1)]
    assert fc1.shape == (128, 64) and fc2.shape == (64, 64)
    want1 = torch.cat([fc1[32:64], fc1[96:128]])
    assert raw_bytes(dst[w1.format(1)]) == raw_bytes(want1)
    assert raw_bytes(dst[w2.format(1)]) == raw_bytes(fc2[:, 32:64])
    assert raw_bytes(dst["decoder.layers.1.mlp.router.weight"]) == raw_bytes(src["decoder.layers.1.mlp.router.weight"])
    local = {k for k in dst if ".experts." in k}
    n_local = 4
    per_expert = 2 if grouped else 4   # weights (+ per-expert _extra_state for SequentialMLP)
    assert len([k for k in local if k.startswith("decoder.layers.0.")]) == n_local * per_expert + (2 if grouped else 0)


def test_cli_dense_to_moe_is_refused(cli, tmp_path):
    s, d = tmp_path / "s", tmp_path / "d"
    assert cli("example", "gpt", "--layout", "tp1pp1", "--layers", "2", "--out", s).code == 0
    for args in (["--to", "tp1pp1ep2"], ["--to", "tp1pp1", "--ep", "2"], ["--to", "tp2pp1ep1etp1"]):
        r = cli("convert", s, d, *args, "--nproc", "0")
        assert r.code == 2, r.out + r.err
        assert "dense -> MoE" in r.err and len(r.err.strip().splitlines()) <= 3
        assert not d.exists()


def test_cli_moe_bad_target_is_refused_before_writing(cli, tmp_path):
    s, d = tmp_path / "s", tmp_path / "d"
    assert cli("example", "moe", "--layout", "tp1pp1", "--layers", "2", "--out", s).code == 0
    for to, msg in (("tp1pp1ep3", "number of experts"), ("tp1pp1ep1etp2", "not representable"),
                    ("tp2pp1ep2etp4", "not representable")):
        r = cli("convert", s, d, "--to", to, "--nproc", "0")
        assert r.code == 2 and msg in r.err, (to, r.err)
        assert not d.exists()
    r = cli("example", "moe", "--layout", "tp2pp1ep1etp2", "--bias", "--layers", "2", "--out", tmp_path / "b")
    assert r.code == 2 and "biases" in r.err


def test_cli_moe_layer_freq_and_shared_experts_round_trip(tmp_path):
    from ckptctl.convert import convert
    from ckptctl.example import example
    from ckptctl.verify import verify
    s, d, b = tmp_path / "s", tmp_path / "d", tmp_path / "b"
    example("moe", parse_layout("tp2pp2ep2"), s, {"layers": 4, "shared_ffn": 32, "swiglu": True,
                                                  "moe_layer_freq": 2, "extra": {"moe_shared_expert_gate": True}})
    f = _file(s, "mp_rank_01_001_001")
    assert "decoder.layers.0.mlp.router.weight" in f and "decoder.layers.1.mlp.linear_fc1.weight" in f
    assert f["decoder.layers.0.mlp.shared_experts.linear_fc1.weight"].shape == (32, 64)   # [2]*32/TP2
    assert f["decoder.layers.0.mlp.shared_experts.gate_weight"].shape == (1, 64)
    convert(s, d, parse_layout("tp1pp1ep4"), nproc=0)
    assert verify(s, d).ok
    convert(d, b, parse_layout("tp2pp2ep2"), nproc=0)
    back = verify(s, b)
    assert back.ok
    sf, bf = _file(s, "mp_rank_00_001_001"), _file(b, "mp_rank_00_001_001")
    assert set(sf) == set(bf)
    for k, v in sf.items():
        if torch.is_tensor(v):
            assert raw_bytes(v) == raw_bytes(bf[k]), k
