"""The pure planner: exact pieces for small layouts, exactly-once ownership, and its errors."""
import pytest

from ckptctl.box import Box
from ckptctl.errors import BadInput, UnknownKey
from ckptctl.layout import FileCoord, Layout
from ckptctl.models import get_family
from ckptctl.models.config import ModelConfig
from ckptctl.reshard.plan import Inventory, plan_source, plan_target

CFG = ModelConfig(family="gpt", num_layers=2, hidden=4, heads=4, groups=4, kv_channels=1, ffn=8, glu=True,
                  tied=False, padded_vocab=256, true_vocab=200, vocab_divisor=128)


def inv(layout: Layout, fc: FileCoord, layers: int, vocab_rows: int) -> Inventory:
    tp = layout.tp
    entries = []
    if fc.pp == 0:
        entries.append(("embedding.word_embeddings.weight", (vocab_rows // tp, 4), "float32"))
    for i in range(layers):
        p = f"decoder.layers.{i}."
        entries += [(p + "input_layernorm.weight", (4,), "float32"),
                    (p + "self_attention.linear_proj.weight", (4, 4 // tp), "float32"),
                    (p + "self_attention.linear_proj._extra_state", None, None),
                    (p + "self_attention.linear_qkv.weight", (12 // tp, 4), "float32"),
                    (p + "mlp.linear_fc1.weight", (16 // tp, 4), "float32"),
                    (p + "mlp.linear_fc2.weight", (4, 8 // tp), "float32")]
    if fc.pp == layout.pp - 1:
        entries += [("decoder.final_layernorm.weight", (4,), "float32"),
                    ("output_layer.weight", (vocab_rows // tp, 4), "float32")]
    return Inventory(fc, fc.dirname(layout), {"model": entries})


def source(layout: Layout):
    per = 2 // layout.pp
    return plan_source(get_family("gpt"), CFG, layout, [inv(layout, fc, per, 256) for fc in layout.model_files])


def test_glu_pieces_tp2():
    plan = source(Layout(tp=2))
    fc1 = [t for t in plan.files[1].tensors if t.key == "decoder.layers.1.mlp.linear_fc1.weight"][0]
    # rank 1 of 2, F = 8: local rows [0,4) are W rows [4,8); local rows [4,8) are V rows [12,16)
    assert [(p.local, p.gbox) for p in fc1.pieces] == [
        (Box((0, 0), (4, 4)), Box((4, 0), (4, 4))),
        (Box((4, 0), (4, 4)), Box((12, 0), (4, 4)))]
    assert fc1.owned == (True, True)


def test_replicas_owned_once_and_pp_renumbering():
    plan = source(Layout(tp=2, pp=2))
    norms = [(fp.dirname, t.gkey, t.owned) for fp in plan.files for t in fp.tensors if "input_layernorm" in t.key]
    assert norms == [("mp_rank_00_000", "decoder.layers.0.input_layernorm.weight", (True,)),
                     ("mp_rank_01_000", "decoder.layers.0.input_layernorm.weight", (False,)),
                     ("mp_rank_00_001", "decoder.layers.1.input_layernorm.weight", (True,)),
                     ("mp_rank_01_001", "decoder.layers.1.input_layernorm.weight", (False,))]
    assert plan.arrays["model/decoder.layers.1.mlp.linear_fc1.weight"]["shape"] == [16, 4]
    # chunks never straddle two writers: the fc1 chunk is one GLU segment slice (F/TP rows)
    assert plan.arrays["model/decoder.layers.1.mlp.linear_fc1.weight"]["chunks"] == [4, 4]
    assert [e["gkey"] for e in plan.manifest][:3] == [
        "embedding.word_embeddings.weight", "decoder.layers.0.input_layernorm.weight",
        "decoder.layers.0.self_attention.linear_proj.weight"]


def test_target_plan_pp_to_tp_and_vocab_padding():
    plan = source(Layout(pp=2))
    files = plan_target(get_family("gpt"), CFG, Layout(tp=4), plan.manifest, plan.arrays, set())
    assert [f.dirname for f in files] == ["mp_rank_00", "mp_rank_01", "mp_rank_02", "mp_rank_03"]
    emb = files[3].tensors[0]
    # V=200 at TP4 pads to 512: rank 3 holds rows [384, 512), all past the source's 256 rows
    assert emb.key == "embedding.word_embeddings.weight" and emb.shape == (128, 4) and emb.pieces == ()
    emb1 = files[1].tensors[0]
    assert [(p.local, p.gbox) for p in emb1.pieces] == [(Box((0, 0), (128, 4)), Box((128, 0), (128, 4)))]
    keys = [t.key for t in files[0].tensors]
    assert "decoder.layers.1.mlp.linear_fc2.weight" in keys and keys[-1] == "output_layer.weight"


def test_layer_beyond_stage_is_an_error():
    lay = Layout(pp=2)
    invs = [inv(lay, fc, 2, 256) for fc in lay.model_files]   # 2 layers per stage but L=2 -> 1 per stage
    with pytest.raises(BadInput, match="beyond"):
        plan_source(get_family("gpt"), CFG, lay, invs)


def test_unknown_key_and_coverage_errors():
    lay = Layout()
    i = inv(lay, FileCoord(0, 0), 2, 256)
    bad = Inventory(i.coord, i.dirname, {"model": i.chunks["model"] + [("decoder.layers.0.foo.weight", (2,), "float32")]})
    with pytest.raises(UnknownKey, match="decoder.layers.0.foo.weight"):
        plan_source(get_family("gpt"), CFG, lay, [bad])
    lay2 = Layout(tp=2)
    invs = [inv(lay2, fc, 2, 256) for fc in lay2.model_files]
    with pytest.raises(BadInput, match="shapes disagree"):
        plan_source(get_family("gpt"), CFG, lay2, [invs[0], inv(Layout(tp=1), FileCoord(1, 0), 2, 256)])


def test_plan_is_deterministic():
    a, b = source(Layout(tp=2, pp=2)), source(Layout(tp=2, pp=2))
    assert a.arrays == b.arrays and a.manifest == b.manifest
    assert [[t for t in f.items] for f in a.files] == [[t for t in f.items] for f in b.files]
