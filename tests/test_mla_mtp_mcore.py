"""DeepSeek-V3-class layers against megatron-core 0.19.2 (tests/mcore/mla_mtp.py): MLA (q/kv LoRA down- and
up-projections, q/kv layernorms), an MTP layer, a first dense layer then MoE layers with shared experts and the
router's expert bias, local spec. megatron-core saves layout A as legacy files and as torch_dist; ckptctl
converts legacy A -> legacy B, torch_dist A -> legacy B and legacy A -> torch_dist at a layout W; megatron-core
loads each at B (legacy strictly, torch_dist with `dist_checkpointing.load`): bytes equal to megatron-core's own
dist_checkpointing reshard of A.

megatron-core cannot build MLA with its local core attention ("TypeError: DotProductAttention.__init__() got an
unexpected keyword argument 'k_channels'"); the harness gives it a parameter-free stand-in, so every weight is
megatron-core's own module's. Not judged here, and why: the TransformerEngine spec (TELinear 'duplicated'
down-projections, norms fused into the up-projections as `layer_norm_weight`) needs TransformerEngine (CUDA);
tests/test_deepseek_layers.py checks those rules against hand-written expectations.

Two torchrun launches for both cases (world 4).
"""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

pytest.importorskip("megatron.core")
pytestmark = pytest.mark.mcore

HARNESS = Path(__file__).parent / "mcore" / "mla_mtp.py"
sys.path.insert(0, str(HARNESS.parent))
from mcore_launch import save_convert_check  # noqa: E402
from mla_mtp import CASES, LOADED  # noqa: E402


@pytest.fixture(scope="module")
def interop(tmp_path_factory):
    work = tmp_path_factory.mktemp("mla_mtp_interop")
    return (*save_convert_check(HARNESS, work, {
        case: [("A", "B", b, None), ("dist", "BD", b, "legacy"), ("A", "BT", w, "torch_dist")]
        for case, (_, _, b, w) in CASES.items()}), work)


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("name", [n for n, _ in LOADED])
def test_converted_checkpoints_load_strictly_with_megatron_bytes(interop, case, name):
    report, _, _ = interop
    ranks = report[case]
    assert len(ranks) == 4
    for r in ranks:
        assert r[name]["strict_load"] == "ok", (name, r[name])
        assert r[name]["mismatch"] == [], (name, r[name])


def test_the_oracle_covers_every_deepseek_part(interop):
    """The expected state dicts hold MLA's down/up projections and norms, the MTP layer (its inner MoE layer
    included), the dense first layer, shared experts, the expert bias, and the MTP stage's embedding copy."""
    report, _, _ = interop
    keys = {k for case in report.values() for r in case for k in r["keys"]}
    for part in ("self_attention.linear_q_down_proj.weight", "self_attention.linear_q_up_proj.weight",
                 "self_attention.linear_kv_down_proj.weight", "self_attention.linear_kv_up_proj.weight",
                 "self_attention.q_layernorm.weight", "self_attention.kv_layernorm.weight",
                 "mtp.layers.0.enorm.weight", "mtp.layers.0.hnorm.weight", "mtp.layers.0.eh_proj.weight",
                 "mtp.layers.0.final_layernorm.weight", "mtp.layers.0.mtp_model_layer.mlp.router.expert_bias",
                 "mtp.layers.0.mtp_model_layer.mlp.experts.local_experts.0.linear_fc1.weight",
                 "decoder.layers.0.mlp.linear_fc1.weight", "mlp.shared_experts.linear_fc2.weight"):
        assert any(k.endswith(part) for k in keys), part
    # layout B of the first case is PP2: the last stage (with MTP) keeps its own word embedding
    last = [r for r in report["tp2ep2_to_tp1pp2"] if r["dir"].endswith("_001")]
    assert last and all("embedding.word_embeddings.weight" in r["keys"] and "mtp.layers.0.eh_proj.weight" in r["keys"]
                        for r in last)


def test_verify_megatron_torch_dist_against_its_legacy_files(interop):
    """ckptctl's reader on megatron-core's own MLA/MTP torch_dist: every global tensor byte-equal to the legacy
    files megatron-core wrote of the same model."""
    from ckptctl.verify import verify
    _, _, work = interop
    for case in CASES:
        rep = verify(work / case / "dist", work / case / "A")
        assert rep.tensors > 40 and rep.equal == rep.tensors, (case, rep)
