"""DeepSeek-V3 / Qwen3-class layer parts: QK layernorm and the router's expert bias (supported; megatron-core
oracles in test_interop_gpt.py's gqa-swiglu case and test_interop_moe.py), MLA and MTP (refused, exit 2)."""
from __future__ import annotations

import pytest

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


@pytest.mark.parametrize("rest", ["self_attention.linear_q_down_proj.weight", "self_attention.linear_kv_up_proj.weight",
                                  "self_attention.kv_layernorm.weight", "self_attention.linear_q_proj.weight"])
def test_mla_tensors_are_refused(rest):
    fam = get_family("gpt")
    with pytest.raises(BadInput, match="multi-latent attention"):
        fam.rule(fam.locate(f"decoder.layers.0.{rest}"), cfg())


def test_mtp_layers_and_flags_are_refused():
    fam = get_family("moe")
    with pytest.raises(BadInput, match="multi-token prediction"):
        fam.locate("mtp.layers.0.eh_proj.weight")
    for extra in ({"mtp_num_layers": 1}, {"multi_latent_attention": True}):
        with pytest.raises(LayoutError, match="not supported"):
            fam.validate(cfg("moe", **extra), Layout())
