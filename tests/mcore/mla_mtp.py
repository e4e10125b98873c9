"""megatron-core oracle for DeepSeek-V3-class layers (run under torchrun, gloo, CPU): multi-latent attention
(q/kv LoRA down- and up-projections, q/kv layernorms), one MTP layer, a first dense layer then MoE layers
with shared experts and the router's expert bias; local spec, RMSNorm, RoPE, untied.

    torchrun --nproc-per-node 4 tests/mcore/mla_mtp.py save WORK CASE...
        per case: build the model at layout A; save torch_dist (WORK/CASE/dist) and Megatron-LM's legacy files
        (WORK/CASE/A)
    torchrun --nproc-per-node 4 tests/mcore/mla_mtp.py check WORK REPORT CASE...
        per case: build at layout B, load WORK/CASE/dist with dist_checkpointing.load (megatron-core reshards:
        the expected local tensors); load ckptctl's WORK/CASE/B, BD (legacy) strictly and BT (torch_dist) with
        dist_checkpointing.load; compare key sets and raw bytes. Rank 0 writes REPORT (JSON).

What megatron-core 0.19.2 cannot build on CPU, and what stands in for it: its local spec's core attention
(`DotProductAttention`) takes no `k_channels`/`v_channels`, so MLASelfAttention fails with
"TypeError: DotProductAttention.__init__() got an unexpected keyword argument 'k_channels' when instantiating
DotProductAttention"; the TE spec needs TransformerEngine (CUDA). Core attention holds no parameters, so a
parameter-free stand-in (`Core`, softmax attention) takes its place; every module with weights is
megatron-core's own. No forward is compared (a layout oracle: bytes only).
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from cpu import (check_converted, dist_metadata, gather, init_parallel, load_dist, rank_dirname,  # noqa: E402
                 run_command, save_dist, save_legacy, write_result)

H, HEADS, FFN, MOE_FFN, SHARED_FFN, E, LAYERS, VOCAB, SEQ = 32, 4, 64, 16, 16, 4, 2, 512, 16
MLA = dict(q_lora_rank=16, kv_lora_rank=6, qk_head_dim=6, qk_pos_emb_head_dim=2, v_head_dim=8)
FREQ = [0, 1]          # DeepSeek-V3's first-k dense layers (k = 1 here)

# case -> ((tp, pp, ep) at A, (tp, pp, ep) at B, ckptctl layout of B, layout W ckptctl writes torch_dist at).
# World size 4; ETP = TP.
CASES = {
    "tp2ep2_to_tp1pp2": ((2, 1, 2), (1, 2, 1), "tp1pp2", "tp4pp1"),      # MTP moves to stage 1 (embedding copy)
    "tp1pp2_to_tp4": ((1, 2, 1), (4, 1, 1), "tp4pp1", "tp2pp2ep2"),      # down-projections split 4 ways
}
LOADED = (("B", "legacy"), ("BD", "legacy"), ("BT", "torch_dist"))


class Core(torch.nn.Module):
    """Parameter-free softmax attention with separate key and value head sizes (see the docstring)."""

    def __init__(self, config, layer_number, attn_mask_type, attention_type, softmax_scale=None, k_channels=None,
                 v_channels=None, cp_comm_type=None, pg_collection=None, **_):
        super().__init__()
        self.scale = softmax_scale

    def forward(self, query, key, value, attention_mask, attn_mask_type=None, packed_seq_params=None, **_):
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))
        s = (q @ k.transpose(-1, -2)) * self.scale
        n = s.shape[-1]
        s = s.masked_fill(torch.triu(torch.ones(n, n, dtype=torch.bool), 1), float("-inf"))
        o = torch.softmax(s, -1) @ v
        return o.permute(2, 0, 1, 3).reshape(o.shape[2], o.shape[0], -1)


def build(tp: int, pp: int, ep: int, seed: int = 1234):
    from megatron.core import parallel_state as ps
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_decoder_block_spec, get_gpt_mtp_block_spec
    from megatron.core.models.gpt.gpt_model import GPTModel
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed
    from megatron.core.transformer.transformer_config import MLATransformerConfig

    model_parallel_cuda_manual_seed(seed, inference_rng_tracker=True)
    torch.manual_seed(seed)
    cfg = MLATransformerConfig(
        num_layers=LAYERS, hidden_size=H, num_attention_heads=HEADS, ffn_hidden_size=FFN,
        multi_latent_attention=True, rope_type="rope", qk_layernorm=True, normalization="RMSNorm", **MLA,
        gated_linear_unit=True, activation_func=torch.nn.functional.silu, add_bias_linear=False,
        num_moe_experts=E, moe_ffn_hidden_size=MOE_FFN, moe_router_topk=2, moe_layer_freq=FREQ,
        moe_shared_expert_intermediate_size=SHARED_FFN, moe_token_dispatcher_type="allgather",
        moe_router_load_balancing_type="none", moe_aux_loss_coeff=0.0,
        moe_router_enable_expert_bias=True, moe_router_score_function="sigmoid", mtp_num_layers=1,
        tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp, expert_model_parallel_size=ep,
        expert_tensor_parallel_size=tp, sequence_parallel=tp > 1, use_cpu_initialization=True,
        perform_initialization=True, pipeline_dtype=torch.float32, hidden_dropout=0.0, attention_dropout=0.0,
        init_method_std=0.05)
    spec = get_gpt_decoder_block_spec(cfg, use_transformer_engine=False, normalization="RMSNorm")
    for layer in spec.layer_specs:
        layer.submodules.self_attention.submodules.core_attention = Core
    mtp = get_gpt_mtp_block_spec(cfg, spec, use_transformer_engine=False)
    model = GPTModel(cfg, spec, vocab_size=VOCAB, max_sequence_length=SEQ, pre_process=ps.is_pipeline_first_stage(),
                     post_process=ps.is_pipeline_last_stage(), share_embeddings_and_output_weights=False,
                     position_embedding_type="rope", mtp_block_spec=mtp)
    model.eval()
    # norms start as ones, routers and the expert bias from per-rank generators: make every byte count, equal
    # on every rank (as replicas must be)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "layernorm" in name or "norm." in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1 + 1.0)
            elif ".router." in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
        for name, b in model.named_buffers():
            if name.endswith("router.expert_bias"):
                b.copy_(torch.randn(b.shape, generator=g) * 0.01)
    return model


def megatron_args(tp: int, pp: int, ep: int, fmt: str = "torch") -> argparse.Namespace:
    world = torch.distributed.get_world_size()
    return argparse.Namespace(
        num_layers=LAYERS, hidden_size=H, ffn_hidden_size=FFN, num_attention_heads=HEADS, num_query_groups=HEADS,
        group_query_attention=False, kv_channels=H // HEADS, swiglu=True, untie_embeddings_and_output_weights=True,
        padded_vocab_size=VOCAB, vocab_size=VOCAB, make_vocab_size_divisible_by=128, max_position_embeddings=SEQ,
        seq_length=SEQ, position_embedding_type="rope", normalization="RMSNorm", add_bias_linear=False,
        multi_latent_attention=True, qk_layernorm=True, **MLA, mtp_num_layers=1,
        num_experts=E, moe_ffn_hidden_size=MOE_FFN, moe_router_topk=2, moe_grouped_gemm=False, moe_layer_freq=FREQ,
        moe_shared_expert_intermediate_size=SHARED_FFN, moe_router_enable_expert_bias=True,
        moe_router_score_function="sigmoid", tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
        virtual_pipeline_model_parallel_size=None, expert_model_parallel_size=ep, expert_tensor_parallel_size=tp,
        context_parallel_size=1, data_parallel_size=world // (tp * pp), world_size=world, sequence_parallel=tp > 1,
        params_dtype=torch.float32, bf16=False, fp16=False, use_distributed_optimizer=False, ckpt_format=fmt,
        transformer_impl="local")


def save(work: str, cases: list[str]) -> None:
    for case in cases:
        (tp, pp, ep), *_ = CASES[case]
        init_parallel(tp=tp, pp=pp, ep=ep, etp=tp)
        model = build(tp, pp, ep)
        root = os.path.join(work, case)
        save_dist(os.path.join(root, "dist"), 1, {
            "args": megatron_args(tp, pp, ep, "torch_dist"), "checkpoint_version": 3.0, "iteration": 1,
            "model": model.sharded_state_dict(metadata=dist_metadata())})
        save_legacy(os.path.join(root, "A"), 1, lambda: {
            "args": megatron_args(tp, pp, ep), "checkpoint_version": 3.0, "iteration": 1,
            "model": model.state_dict_for_save_checkpoint()})


def check(work: str, report: str, cases: list[str]) -> None:
    results = {}
    for case in cases:
        _, (tp, pp, ep), *_ = CASES[case]
        init_parallel(tp=tp, pp=pp, ep=ep, etp=tp)
        root = os.path.join(work, case)
        ref = build(tp, pp, ep, seed=99)             # other init: every byte must come from the load
        load_dist(ref, os.path.join(root, "dist"), 1)
        expected = ref.state_dict_for_save_checkpoint()
        res = {"rank": torch.distributed.get_rank(), "dir": rank_dirname(),
               "tensors": sum(torch.is_tensor(v) for v in expected.values()),
               "keys": sorted(k for k, v in expected.items() if torch.is_tensor(v))}
        for name, fmt in LOADED:
            res[name] = check_converted(build(tp, pp, ep, seed=7), os.path.join(root, name), fmt, 1, expected)
        results[case] = gather(res)
    write_result(report, results)


def main(argv: list[str]) -> None:
    run_command(argv, {"save": lambda out, *a: save(out, list(a)),
                       "check": lambda root, report, *a: check(root, report, list(a))})


if __name__ == "__main__":
    main(sys.argv[1:])
