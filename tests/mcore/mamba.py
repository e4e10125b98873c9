"""megatron-core oracle for Mamba / hybrid models (run under torchrun, gloo, CPU; world size 4).

    torchrun --nproc-per-node 4 tests/mcore/mamba.py save WORK CASE...
        per case: build megatron-core's HybridModel at the case's layout A (the stand-in `mamba_ssm` in
        tests/mcore/standin makes the Mamba mixer buildable; local linears under TE key names); save it
        with dist_checkpointing.save as Megatron-LM lays out torch_dist (WORK/CASE/dist: tracker,
        iter_0000001, common args) and as Megatron-LM's legacy files (WORK/CASE/A:
        DP-rank-0 ranks write mp_rank_TT[_PPP]/model_optim_rng.pt, the mixer's state dict as 0.19.2 writes
        it: `conv1d_weight`/`conv1d_bias`).
    torchrun --nproc-per-node 4 tests/mcore/mamba.py check WORK REPORT CASE...
        per case: build the model at layout B; fill one copy with dist_checkpointing.load(WORK/CASE/dist)
        (megatron-core reshards in_proj z/x/B/C/dt, conv1d x/B/C itself: the expected local tensors);
        load WORK/CASE/B (legacy, made by ckptctl) strictly into another; compare key sets and raw bytes.
        Cases of DIST_CASES also load WORK/CASE/BD (legacy, ckptctl's conversion of mcore's torch_dist)
        strictly and WORK/CASE/BT (torch_dist ckptctl wrote at layout W from A) with dist_checkpointing.load.
        Rank 0 writes REPORT (JSON). No forward: the scan kernels need CUDA.
    torchrun --nproc-per-node 1 tests/mcore/mamba.py keys PATTERN
        print the state-dict keys and shapes of a TP1PP1 model (to pin names and order).

Uses none of ckptctl's sharding rules or file-set logic: the expectations come from megatron-core alone.
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from cpu import (check_converted, compare_state, dist_metadata, gather, load_dist, rank_dirname, save_dist,  # noqa: E402
                 save_legacy, write_result)
HIDDEN, HEADS, FFN, VOCAB, SEQ = 64, 8, 128, 512, 16
MAMBA = {"mamba_num_heads": 8, "mamba_head_dim": 8, "mamba_state_dim": 16}

# case -> the layout W ckptctl writes torch_dist at (from A), loaded at B; ckptctl also converts mcore's
# torch_dist at A to legacy at B (BD).
DIST_CASES = {"tp2pp2_to_tp4pp1": "tp1pp2"}
# case -> (layout A (tp, pp), pattern at A, layout B (tp, pp), pattern B must carry, ckptctl layout of B,
#          mamba groups, D_has_hdim). World size 4 everywhere; DP fills the rest.
CASES = {
    # '|' pattern segments follow PP at A; TP 2 -> 4 with 4 groups; the target pattern loses its pipe.
    "tp2pp2_to_tp4pp1": ((2, 2), "M*|M-", (4, 1), "M*M-", "tp4pp1", 4, False),
    # TP 4 -> 1 with 8 groups and a per-channel D; PP 1 -> 2 splits the pipe-free pattern evenly.
    "tp4pp1_to_tp1pp2": ((4, 1), "M-M*", (1, 2), "M-M*", "tp1pp2dp2", 8, True),
}


def standin() -> None:
    sys.path.insert(0, os.path.join(HERE, "standin"))


def local_te_linears():
    """Local (non-TE) linears under TransformerEngine's key names: a column-parallel linear with a fused
    input norm (`layer_norm_weight`, TE's registration order: norm first), and a plain row-parallel one."""
    from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear

    class LNColumn(ColumnParallelLinear):
        def __init__(self, input_size, output_size, *, config, **kw):
            super().__init__(input_size, output_size, config=config, **kw)
            w = torch.nn.Parameter(torch.empty(input_size, dtype=config.params_dtype))
            torch.nn.init.ones_(w)
            self._parameters = {"layer_norm_weight": w, **self._parameters}

    class Row(RowParallelLinear):
        pass

    return LNColumn, Row


def spec():
    """megatron-core's hybrid stack spec with local modules (its own spec is TE-only)."""
    from functools import partial

    from megatron.core.models.hybrid import hybrid_block
    from megatron.core.models.hybrid.hybrid_block import HybridStack, HybridStackSubmodules
    from megatron.core.ssm.mamba_layer import MambaLayer, MambaLayerSubmodules
    from megatron.core.ssm.mamba_mixer import MambaMixer, MambaMixerSubmodules
    from megatron.core.ssm.mlp_layer import MLPLayer
    from megatron.core.transformer.attention import SelfAttention, SelfAttentionSubmodules
    from megatron.core.transformer.dot_product_attention import DotProductAttention
    from megatron.core.transformer.enums import AttnMaskType
    from megatron.core.transformer.mlp import MLP, MLPSubmodules
    from megatron.core.transformer.spec_utils import ModuleSpec
    from megatron.core.transformer.torch_norm import WrappedTorchNorm
    from megatron.core.transformer.transformer_layer import TransformerLayer, TransformerLayerSubmodules
    from megatron.core.fusions.fused_bias_dropout import get_bias_dropout_add

    hybrid_block.TENorm = WrappedTorchNorm          # the final norm (MCORE_ON_CPU.md)
    LNColumn, Row = local_te_linears()
    return ModuleSpec(module=HybridStack, submodules=HybridStackSubmodules(
        mamba_layer=ModuleSpec(module=MambaLayer, submodules=MambaLayerSubmodules(
            mixer=ModuleSpec(module=MambaMixer, submodules=MambaMixerSubmodules(in_proj=LNColumn, out_proj=Row)),
            mamba_bda=get_bias_dropout_add)),
        attention_layer=ModuleSpec(module=TransformerLayer, submodules=TransformerLayerSubmodules(
            self_attention=ModuleSpec(module=SelfAttention, params={"attn_mask_type": AttnMaskType.causal},
                                      submodules=SelfAttentionSubmodules(
                                          linear_qkv=LNColumn, core_attention=DotProductAttention,
                                          linear_proj=Row)),
            self_attn_bda=get_bias_dropout_add)),
        mlp_layer=ModuleSpec(module=MLPLayer, submodules=TransformerLayerSubmodules(
            mlp=partial(MLP.as_mlp_submodule, submodules=MLPSubmodules(linear_fc1=LNColumn, linear_fc2=Row)),
            mlp_bda=get_bias_dropout_add)),
    ))


def build(case: str, side: str, seed: int):
    from cpu import init_parallel
    from megatron.core import parallel_state as ps
    from megatron.core.models.hybrid.hybrid_model import HybridModel
    from megatron.core.transformer.transformer_config import TransformerConfig

    (tpa, ppa), pat_a, (tpb, ppb), pat_b, _, groups, d_hdim = CASES[case]
    tp, pp, pattern = (tpa, ppa, pat_a) if side == "A" else (tpb, ppb, pat_b)
    init_parallel(tp=tp, pp=pp, seed=seed)
    cfg = TransformerConfig(
        num_layers=len(pattern.replace("|", "")), hidden_size=HIDDEN, num_attention_heads=HEADS,
        ffn_hidden_size=FFN, add_bias_linear=False, normalization="RMSNorm", mamba_num_groups=groups, **MAMBA,
        tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp, is_hybrid_model=True,
        params_dtype=torch.float32, pipeline_dtype=torch.float32, use_cpu_initialization=True,
        perform_initialization=True, hidden_dropout=0.0, attention_dropout=0.0, init_method_std=0.05)
    s = spec()
    if d_hdim:
        s.submodules.mamba_layer.submodules.mixer.params = {"D_has_hdim": True}
    torch.manual_seed(seed + 100 * ps.get_pipeline_model_parallel_rank())
    model = HybridModel(cfg, s, vocab_size=VOCAB, max_sequence_length=SEQ, hybrid_layer_pattern=pattern,
                        pre_process=ps.is_pipeline_first_stage(), post_process=ps.is_pipeline_last_stage(),
                        share_embeddings_and_output_weights=False, position_embedding_type="none")
    # Constant-initialised tensors (norms, D) get distinct values so that no misplaced slice hides.
    g = torch.Generator().manual_seed(seed * 7 + 100 * ps.get_pipeline_model_parallel_rank()
                                      + ps.get_tensor_model_parallel_rank())
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.1 + (1.0 if p.dim() == 1 else 0.0))
    # Replicated tensors must be equal across TP ranks: take TP rank 0's.
    for name, p in model.named_parameters():
        if not getattr(p, "tensor_model_parallel", False):
            torch.distributed.broadcast(p.data, src=ps.get_tensor_model_parallel_src_rank(),
                                        group=ps.get_tensor_model_parallel_group())
    return model


def megatron_args(case: str, side: str, fmt: str = "torch") -> argparse.Namespace:
    (tpa, ppa), pat_a, (tpb, ppb), pat_b, _, groups, _ = CASES[case]
    tp, pp, pattern = (tpa, ppa, pat_a) if side == "A" else (tpb, ppb, pat_b)
    world = torch.distributed.get_world_size()
    return argparse.Namespace(
        num_layers=len(pattern.replace("|", "")), hidden_size=HIDDEN, ffn_hidden_size=FFN,
        num_attention_heads=HEADS, num_query_groups=None, group_query_attention=False,
        kv_channels=HIDDEN // HEADS, swiglu=False, untie_embeddings_and_output_weights=True,
        padded_vocab_size=VOCAB, vocab_size=VOCAB, make_vocab_size_divisible_by=128, max_position_embeddings=SEQ,
        seq_length=SEQ, position_embedding_type="none", normalization="RMSNorm", add_bias_linear=False,
        hybrid_layer_pattern=pattern, hybrid_override_pattern=None, mamba_num_groups=groups,
        mamba_num_heads=MAMBA["mamba_num_heads"], mamba_head_dim=MAMBA["mamba_head_dim"],
        mamba_state_dim=MAMBA["mamba_state_dim"], is_hybrid_model=True,
        tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp, virtual_pipeline_model_parallel_size=None,
        expert_model_parallel_size=1, expert_tensor_parallel_size=tp, context_parallel_size=1,
        data_parallel_size=world // (tp * pp), world_size=world, sequence_parallel=False,
        params_dtype=torch.float32, bf16=False, fp16=False, use_distributed_optimizer=False, ckpt_format=fmt)


dirname = rank_dirname      # Megatron-LM's get_checkpoint_name for this rank


def save(work: str, cases: list[str]) -> None:
    for case in cases:
        model = build(case, "A", seed=1234)
        root = os.path.join(work, case)
        save_dist(os.path.join(root, "dist"), 1, {
            "args": megatron_args(case, "A", "torch_dist"), "checkpoint_version": 3.0, "iteration": 1,
            "model": model.sharded_state_dict(metadata=dist_metadata())})
        save_legacy(os.path.join(root, "A"), 1, lambda: {
            "args": megatron_args(case, "A"), "checkpoint_version": 3.0, "iteration": 1,
            "model": model.state_dict_for_save_checkpoint()})


def check(work: str, report: str, cases: list[str]) -> None:
    results = {}
    for case in cases:
        root = os.path.join(work, case)
        ref = build(case, "B", seed=99)           # other values: every byte must come from the load
        load_dist(ref, os.path.join(root, "dist"), 1)
        expected = ref.state_dict_for_save_checkpoint()
        res = {"rank": torch.distributed.get_rank(), "dir": dirname(), "mismatch": [], "keys": list(expected)}
        path = os.path.join(root, "B", "iter_0000001", dirname(), "model_optim_rng.pt")
        sd = torch.load(path, map_location="cpu", weights_only=False)
        ours = sd["model"]
        res["pattern"] = getattr(sd["args"], "hybrid_layer_pattern", None)
        if list(ours) != list(expected):
            res["mismatch"].append(f"keys or order differ: {sorted(set(ours) ^ set(expected))[:4]}")
        res["tensors"] = sum(torch.is_tensor(v) for v in expected.values())
        res["mismatch"] += compare_state(ours, expected)[0]
        mine = build(case, "B", seed=7)
        try:
            mine.load_state_dict(ours, strict=True)
            res["strict_load"] = "ok"
        except Exception as e:  # noqa: BLE001 - reported, the test fails on it
            res["strict_load"] = str(e)[:300]
        for name, fmt in (("BD", "legacy"), ("BT", "torch_dist")) if case in DIST_CASES else ():
            res[name] = check_converted(build(case, "B", seed=8), os.path.join(root, name), fmt, 1, expected)
        results[case] = gather(res)
    write_result(report, results)


def keys(pattern: str) -> None:
    CASES["probe"] = ((1, 1), pattern, (1, 1), pattern, "tp1pp1", 2, False)
    model = build("probe", "A", seed=1)
    for k, v in model.state_dict_for_save_checkpoint().items():
        print(k, tuple(v.shape) if torch.is_tensor(v) else type(v).__name__)


def main(argv: list[str]) -> None:
    from cpu import run_command
    run_command(argv, {"save": lambda out, *a: save(out, list(a)),
                       "check": lambda root, report, *a: check(root, report, list(a)),
                       "keys": keys}, setup=(standin,))


if __name__ == "__main__":
    main(sys.argv[1:])
