"""DeepSeek-V3 / Qwen3-class layer parts: QK layernorm and the router's expert bias (megatron-core oracles in
test_interop_gpt.py's gqa-swiglu case and test_interop_moe.py); MLA and MTP (megatron-core oracle for the local
spec in test_mla_mtp_mcore.py). Here: the rules against expectations written by hand from megatron-core 0.19.2's
source (ckptctl/models/deepseek.py says where), among them the TransformerEngine spec's that megatron-core cannot
build on CPU (TELinear 'duplicated' down-projections, fused `layer_norm_weight`), and split -> merge round trips."""
from __future__ import annotations

import pytest

import torch

from ckptctl.errors import BadInput, LayoutError
from ckptctl.layout import FileCoord, Layout
from ckptctl.models import get_family
from ckptctl.models.config import ModelConfig, config_from_args
from ckptctl.reshard import plan


def cfg(family="gpt", **extra) -> ModelConfig:
    return ModelConfig(family=family, num_layers=2, hidden=16, heads=4, groups=2, kv_channels=4, ffn=32, glu=True,
                       tied=False, padded_vocab=128, true_vocab=128, vocab_divisor=128,
                       num_experts=4 if family == "moe" else 0, moe_ffn=8 if family == "moe" else None,
                       extra={"add_bias_linear": False, "normalization": "RMSNorm", **extra})


def layer0(fam, c):
    return [(k.removeprefix("decoder.layers.0."), s) for k, s in fam.global_keys(c) if k.startswith("decoder.layers.0.")]


def test_qk_layernorm_keys_in_megatron_core_order():
    # the order megatron-core 0.19.2's local spec saves (seen in its legacy files): after linear_qkv
    got = [k for k, _ in layer0(get_family("gpt"), cfg(qk_layernorm=True))]
    assert got == ["input_layernorm.weight", "self_attention.linear_proj.weight",
                   "self_attention.linear_proj._extra_state", "self_attention.linear_qkv.weight",
                   "self_attention.linear_qkv._extra_state", "self_attention.q_layernorm.weight",
                   "self_attention.k_layernorm.weight", "pre_mlp_layernorm.weight", "mlp.linear_fc1.weight",
                   "mlp.linear_fc1._extra_state", "mlp.linear_fc2.weight", "mlp.linear_fc2._extra_state"]
    assert dict(layer0(get_family("gpt"), cfg(qk_layernorm=True)))["self_attention.q_layernorm.weight"] == (4,)


def _plan(fam, c, src: Layout, dst: Layout):
    keys = fam.global_keys(c)
    sp = plan.plan_source(fam, c, Layout(), [plan.Inventory(FileCoord(0, 0), "g", {
        "model": [(k, s, None if s is None else "float32") for k, s in keys]})])
    return sp, plan.plan_target(fam, c, dst, sp.manifest, sp.arrays, set(sp.slots))


def test_qk_layernorm_is_replicated_over_tp():
    fam, c = get_family("gpt"), cfg(qk_layernorm=True)
    _, files = _plan(fam, c, Layout(), Layout(tp=2))
    for f in files:
        t = next(t for t in f.tensors if t.key == "decoder.layers.1.self_attention.k_layernorm.weight")
        assert t.shape == (4,) and [(p.local.offsets, p.gbox.offsets, p.gbox.sizes) for p in t.pieces] == [
            ((0,), (0,), (4,))]


def test_router_expert_bias_key_replicated_and_without_optimizer_state():
    fam, c = get_family("moe"), cfg("moe", moe_router_enable_expert_bias=True)
    keys = [k for k, _ in layer0(fam, c)]
    assert keys[keys.index("mlp.router.weight") + 1] == "mlp.router.expert_bias"
    assert dict(layer0(fam, c))["mlp.router.expert_bias"] == (4,)
    _, files = _plan(fam, c, Layout(), Layout(tp=2, ep=2, etp=1))
    held = [(f.dirname, [p.gbox for p in t.pieces]) for f in files for t in f.tensors
            if t.key == "decoder.layers.0.mlp.router.expert_bias"]
    assert len(held) == len(files) and all(len(b) == 1 and b[0].sizes == (4,) for _, b in held)
    assert not fam.optimizer_state("mlp.router.expert_bias") and fam.optimizer_state("mlp.router.weight")


def test_flags_read_from_args():
    base = {"num_layers": 2, "hidden_size": 16, "num_attention_heads": 4}
    c = config_from_args({**base, "qk_layernorm": True, "moe_router_enable_expert_bias": True, "num_experts": 4}, "moe")
    assert c.extra["qk_layernorm"] and c.extra["moe_router_enable_expert_bias"]


MLA = {"multi_latent_attention": True, "q_lora_rank": 8, "kv_lora_rank": 4, "qk_head_dim": 2, "qk_pos_emb_head_dim": 2,
       "v_head_dim": 4, "qk_layernorm": True, "position_embedding_type": "rope"}


def _held(files, key):
    """{file: [(local offsets, global offsets, sizes)]} of one global key."""
    out = {}
    for f in files:
        for t in f.tensors:
            if t.key == key or t.gkey == key:
                out.setdefault(f.dirname, []).extend((p.local.offsets, p.gbox.offsets, p.gbox.sizes) for p in t.pieces)
    return out


@pytest.mark.parametrize("impl, split", [("local", True), ("transformer_engine", False), (None, False)])
def test_mla_down_projections_split_under_the_local_spec_replicated_under_te(impl, split):
    # local spec: ColumnParallelLinear, rows r*n/TP..; TE: TELinear(parallel_mode='duplicated'), the whole tensor
    extra = {**MLA, **({"transformer_impl": impl} if impl else {})}
    fam, c = get_family("gpt"), cfg(**extra)
    _, files = _plan(fam, c, Layout(), Layout(tp=2))
    for key, rows in (("self_attention.linear_q_down_proj.weight", 8), ("self_attention.linear_kv_down_proj.weight", 6)):
        held = _held(files, f"decoder.layers.1.{key}")
        want = ({"mp_rank_00": [((0, 0), (0, 0), (rows // 2, 16))], "mp_rank_01": [((0, 0), (rows // 2, 0), (rows // 2, 16))]}
                if split else {d: [((0, 0), (0, 0), (rows, 16))] for d in ("mp_rank_00", "mp_rank_01")})
        assert held == want, key


def test_mla_up_projections_per_head_rows_and_norms_replicated():
    fam, c = get_family("gpt"), cfg(**MLA, transformer_impl="local")
    keys = dict(layer0(fam, c))
    # np*(qk_head_dim+qk_pos_emb_head_dim) x q_lora_rank; np*(qk_head_dim+v_head_dim) x kv_lora_rank; H x np*v_head_dim
    assert keys["self_attention.linear_q_up_proj.weight"] == (16, 8)
    assert keys["self_attention.linear_kv_up_proj.weight"] == (24, 4)
    assert keys["self_attention.linear_kv_down_proj.weight"] == (6, 16)
    assert keys["self_attention.linear_proj.weight"] == (16, 16)
    assert keys["self_attention.q_layernorm.weight"] == (8,) and keys["self_attention.kv_layernorm.weight"] == (4,)
    _, files = _plan(fam, c, Layout(), Layout(tp=2))
    assert _held(files, "decoder.layers.0.self_attention.linear_kv_up_proj.weight")["mp_rank_01"] == [
        ((0, 0), (12, 0), (12, 4))]                                                # heads 2, 3
    assert _held(files, "decoder.layers.0.self_attention.linear_proj.weight")["mp_rank_01"] == [
        ((0, 0), (0, 8), (16, 8))]
    assert _held(files, "decoder.layers.0.self_attention.kv_layernorm.weight")["mp_rank_01"] == [((0,), (0,), (4,))]
    # TE names: the q/kv norms fused into the up-projections, replicated
    rule = fam.rule(fam.locate("decoder.layers.0.self_attention.linear_q_up_proj.layer_norm_weight"), c)
    assert rule.kind == "replicated"
    assert fam.rule(fam.locate("decoder.layers.0.self_attention.linear_q_proj.weight"), c).kind == "split"


def test_mla_fused_down_projection_and_indivisible_ranks_are_refused():
    fam, c = get_family("gpt"), cfg(**MLA, transformer_impl="local")
    with pytest.raises(BadInput, match="fused q/kv down-projection"):
        fam.rule(fam.locate("decoder.layers.0.self_attention.linear_qkv_down_proj.weight"), c)
    with pytest.raises(LayoutError, match="kv_lora_rank"):       # 4 + 2 rows over TP 4
        fam.validate(c, Layout(tp=4))
    fam.validate(cfg(**MLA), Layout(tp=4))     # TE: the down-projections are whole on every rank


def test_mtp_layers_on_the_last_chunk_with_an_embedding_copy():
    import dataclasses
    fam = get_family("moe")
    c = dataclasses.replace(cfg("moe", **MLA, transformer_impl="local", mtp_num_layers=2), num_layers=4)
    keys = [k for k, _ in fam.global_keys(c)]
    assert keys.index("decoder.final_layernorm.weight") < keys.index("mtp.layers.0.enorm.weight") < keys.index(
        "mtp.layers.1.final_layernorm.weight") < keys.index("output_layer.weight")
    assert "mtp.layers.1.mtp_model_layer.mlp.experts.local_experts.3.linear_fc2.weight" in keys
    _, files = _plan(fam, c, Layout(), Layout(pp=2, vpp=2, ep=2))
    for f in files:
        gk = {t.gkey for t in f.tensors}
        last = f.coord.pp == 1
        assert ("mtp.layers.1.eh_proj.weight" in gk) == last
        assert "embedding.word_embeddings.weight" in gk         # first stage, and the MTP stage's copy
        mtp = [t for t in f.tensors if t.gkey.startswith("mtp.")]
        assert all(t.chunk == "model1" for t in mtp)              # the last virtual chunk
        experts = {t.gkey.split("local_experts.")[1].split(".")[0] for t in mtp if "local_experts" in t.gkey}
        assert experts == ({"0", "1"} if f.coord.ep == 0 else {"2", "3"}) or not last
        assert {t.key for t in mtp} >= {"mtp.layers.0.enorm.weight"} or not last     # local MTP index = global
    _, one = _plan(fam, c, Layout(), Layout(tp=2))
    assert [k for k in _held(one, "embedding.word_embeddings.weight")] == ["mp_rank_00", "mp_rank_01"]
    assert _held(one, "mtp.layers.0.eh_proj.weight")["mp_rank_01"] == [((0, 0), (8, 0), (8, 32))]   # (H, 2H) rows
    assert fam.rule(fam.locate("mtp.layers.0.transformer_layer.self_attention.linear_q_up_proj.weight"), c).kind == "split"


def test_mtp_refusals():
    fam = get_family("moe")
    with pytest.raises(LayoutError, match="explicit pipeline layout"):
        fam.validate(cfg("moe", mtp_num_layers=1, position_embedding_type="rope",
                         pipeline_model_parallel_layout="Et|tL"), Layout(pp=2))
    with pytest.raises(LayoutError, match="learned absolute"):
        fam.validate(cfg("moe", mtp_num_layers=1), Layout(pp=2))
    fam.validate(cfg("moe", mtp_num_layers=1), Layout())
    for name in ("bert", "mamba"):
        with pytest.raises(BadInput, match="multi-token prediction"):
            get_family(name).locate("mtp.layers.0.eh_proj.weight")
    assert fam.stack_layers(cfg("moe", mtp_num_layers=3, mtp_use_repeated_layer=True)) == {"decoder": 2, "mtp": 1}


def test_mla_mtp_args_read():
    base = {"num_layers": 2, "hidden_size": 16, "num_attention_heads": 4}
    c = config_from_args({**base, **MLA, "transformer_impl": "local", "mtp_num_layers": 1}, "gpt")
    assert {k: c.extra[k] for k in MLA} == MLA and c.extra["transformer_impl"] == "local" and c.extra["mtp_num_layers"] == 1


def _model(root, d):
    return torch.load(next(root.glob(f"iter_*/{d}/model_optim_rng.pt")), weights_only=False)["model"]


def test_example_round_trip_and_hand_split(tmp_path):
    """`ckptctl example moe --mla --mtp 1 --dense-layers 1 --expert-bias --shared-ffn`: legacy and torch_dist
    round trips verify equal; the TP2 files hold the hand-cut rows of the TP1 tensors."""
    from ckptctl.convert import convert
    from ckptctl.example import example
    from ckptctl.verify import verify
    opts = {"layers": 4, "hidden": 32, "heads": 4, "experts": 4, "moe_ffn": 16, "swiglu": True, "shared_ffn": 16,
            "norm": "RMSNorm", "mla": True, "mtp": 1, "dense_layers": 1, "expert_bias": True}
    a, b, c, d = (tmp_path / x for x in "abcd")
    example("moe", Layout(), a, opts)
    convert(a, b, Layout(tp=2, pp=2, ep=2), nproc=0)
    convert(b, c, Layout(), nproc=0)
    convert(a, d, Layout(tp=2), nproc=0, to_format="torch_dist")
    for x in (b, c, d):
        rep = verify(a, x)
        assert rep.tensors > 60 and rep.equal == rep.tensors, (x, rep)
    src = _model(a, "mp_rank_00")
    for tp in (0, 1):
        last = _model(b, f"mp_rank_{tp:02d}_001_001")     # stage 1 (MTP), EP rank 1
        for key in ("mtp.layers.0.mtp_model_layer.self_attention.linear_q_down_proj.weight",
                    "mtp.layers.0.mtp_model_layer.self_attention.linear_kv_up_proj.weight", "mtp.layers.0.eh_proj.weight"):
            g = src[key]
            n = g.shape[0] // 2
            assert last[key].view(torch.uint8).equal(g[tp * n:(tp + 1) * n].contiguous().view(torch.uint8)), key
        e = "mtp.layers.0.mtp_model_layer.mlp.experts.local_experts.{}.linear_fc2.weight"
        ge, half = src[e.format(3)], src[e.format(3)].shape[1] // 2       # global expert 3 = EP 1's local 1, ETP cols
        assert last[e.format(1)].view(torch.uint8).equal(ge[:, tp * half:(tp + 1) * half].contiguous().view(torch.uint8))
        emb = _model(b, f"mp_rank_{tp:02d}_000_000")["embedding.word_embeddings.weight"]
        assert last["embedding.word_embeddings.weight"].view(torch.uint8).equal(emb.view(torch.uint8))


def test_mtp_inner_layer_under_its_older_name(tmp_path):
    """Legacy files of older megatron-core name the MTP inner layer `transformer_layer.`: read as the same tensors
    (optimizer state placed by the model's order), written under 0.19.2's `mtp_model_layer.`."""
    from ckptctl.convert import convert
    from ckptctl.example import example
    from ckptctl.verify import verify
    a, b = tmp_path / "a", tmp_path / "b"
    example("gpt", Layout(), a, {"layers": 2, "hidden": 32, "heads": 4, "mla": True, "mtp": 1, "norm": "RMSNorm"})
    f = next(a.glob("iter_*/mp_rank_00/model_optim_rng.pt"))
    d = torch.load(f, weights_only=False)
    d["model"] = {k.replace(".mtp_model_layer.", ".transformer_layer."): v for k, v in d["model"].items()}
    assert any(".transformer_layer." in k for k in d["model"])
    torch.save(d, f)
    convert(a, b, Layout(tp=2, pp=2), nproc=0)
    rep = verify(a, b)
    assert rep.tensors > 40 and rep.equal == rep.tensors, rep
    last = _model(b, "mp_rank_01_001")
    assert any(".mtp_model_layer." in k for k in last) and not any(".transformer_layer." in k for k in last)
