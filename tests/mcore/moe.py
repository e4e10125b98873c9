"""megatron-core oracle for MoE models with sequential experts (run under torchrun, gloo, CPU).

    torchrun --nproc-per-node 4 tests/mcore/moe.py save WORK CASE...
        per case: build a GPT with MoE layers (SequentialMLP experts, GLU, no biases, local spec) at the
        case's layout A; save it with dist_checkpointing.save as Megatron-LM lays out torch_dist
        (WORK/CASE/dist: tracker, iter_0000001, common args), save Megatron-LM's legacy files (WORK/CASE/A:
        ranks with DP rank 0 or expert-DP rank 0 write mp_rank_TT[_EEE]) and the forward logits
        (WORK/CASE/logits_A.pt)
    torchrun --nproc-per-node 4 tests/mcore/moe.py check WORK REPORT CASE...
        per case: build the model at layout B; load WORK/CASE/dist with dist_checkpointing.load
        (megatron-core reshards it itself: the expected local tensors); then, each into a fresh model,
        the checkpoints ckptctl made: WORK/CASE/B (legacy, from A) and WORK/CASE/BD (legacy, from mcore's
        torch_dist) strictly, WORK/CASE/BT (torch_dist written at layout W, from A) with
        dist_checkpointing.load; compare key sets and raw bytes; compare every model's forward logits
        with A's. Rank 0 writes REPORT (JSON).

Uses none of ckptctl's sharding rules or file-set logic: the expectations come from megatron-core alone.
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from cpu import (check_converted, cpu_patches, dist_metadata, gather, init_parallel, load_dist,  # noqa: E402,F401
                 rank_dirname, run_command, save_dist, save_legacy, write_result)

HIDDEN, HEADS, FFN, MOE_FFN, EXPERTS, LAYERS, VOCAB, SEQ = 32, 4, 64, 32, 4, 2, 512, 16

# case -> ((tp, ep, etp) at A, (tp, ep, etp) at B, ckptctl layout of B, layout W ckptctl writes torch_dist
# at, to be loaded at B). World size 4 everywhere.
CASES = {
    "ep4_to_tp2ep2etp2": ((1, 4, 1), (2, 2, 2), "tp2pp1ep2etp2", "tp1pp1"),   # EP and ETP both change
    "tp2ep2etp1_to_tp4ep1etp1": ((2, 2, 1), (4, 1, 1), "tp4pp1ep1etp1", "tp1pp1ep4etp1"),  # ETP != TP
}
# What check loads at B: (directory below WORK/CASE, format).
LOADED = (("B", "legacy"), ("BD", "legacy"), ("BT", "torch_dist"))


def init(tp: int, ep: int, etp: int) -> None:
    init_parallel(tp=tp, ep=ep, etp=etp)


def build(tp: int, ep: int, etp: int, seed: int = 1234):
    from megatron.core import parallel_state as ps
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.models.gpt.gpt_model import GPTModel
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed
    from megatron.core.transformer.transformer_config import TransformerConfig

    model_parallel_cuda_manual_seed(seed, inference_rng_tracker=True)
    # CPU initialisation draws each full weight from the default generator and slices it: seeding that
    # generator alike on every rank makes DP/EP replicas equal, as a real run's are
    torch.manual_seed(seed)
    cfg = TransformerConfig(
        num_layers=LAYERS, hidden_size=HIDDEN, num_attention_heads=HEADS, ffn_hidden_size=FFN,
        gated_linear_unit=True, activation_func=torch.nn.functional.silu, add_bias_linear=False,
        num_moe_experts=EXPERTS, moe_ffn_hidden_size=MOE_FFN, moe_router_topk=2,
        moe_token_dispatcher_type="allgather", moe_router_load_balancing_type="none", moe_aux_loss_coeff=0.0,
        # aux-loss-free balancing (DeepSeek-V3): a persistent fp32 `router.expert_bias` buffer per layer
        moe_router_enable_expert_bias=True, moe_router_score_function="sigmoid",
        tensor_model_parallel_size=tp, expert_model_parallel_size=ep, expert_tensor_parallel_size=etp,
        sequence_parallel=tp > 1, use_cpu_initialization=True, perform_initialization=True,
        pipeline_dtype=torch.float32, hidden_dropout=0.0, attention_dropout=0.0, init_method_std=0.05)
    model = GPTModel(cfg, get_gpt_layer_local_spec(num_experts=EXPERTS, moe_grouped_gemm=False),
                     vocab_size=VOCAB, max_sequence_length=SEQ, pre_process=True, post_process=True,
                     share_embeddings_and_output_weights=False, parallel_output=False)
    model.eval()
    # Norms start as ones/zeros: make every byte count. The router and the position embedding are drawn from
    # the default CPU generator, whose state differs between ranks here: draw them again, equal on every
    # rank (as TP replicas must be).
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "layernorm" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1 + 1.0)
            elif ".router." in name or "position_embeddings" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
        for name, b in model.named_buffers():   # the expert bias starts at zero: make it count too
            if name.endswith("router.expert_bias"):
                b.copy_(torch.randn(b.shape, generator=g) * 0.01)
    assert ps.get_tensor_model_parallel_world_size() == tp
    return model


def megatron_args(tp: int, ep: int, etp: int, fmt: str = "torch") -> argparse.Namespace:
    world = torch.distributed.get_world_size()
    return argparse.Namespace(
        num_layers=LAYERS, hidden_size=HIDDEN, ffn_hidden_size=FFN, num_attention_heads=HEADS,
        num_query_groups=HEADS, group_query_attention=False, kv_channels=HIDDEN // HEADS, swiglu=True,
        untie_embeddings_and_output_weights=True, padded_vocab_size=VOCAB, vocab_size=VOCAB,
        make_vocab_size_divisible_by=128, max_position_embeddings=SEQ, seq_length=SEQ,
        position_embedding_type="learned_absolute", normalization="LayerNorm", add_bias_linear=False,
        num_experts=EXPERTS, moe_ffn_hidden_size=MOE_FFN, moe_router_topk=2, moe_grouped_gemm=False,
        moe_router_enable_expert_bias=True, moe_router_score_function="sigmoid",
        tensor_model_parallel_size=tp, pipeline_model_parallel_size=1, virtual_pipeline_model_parallel_size=None,
        expert_model_parallel_size=ep, expert_tensor_parallel_size=etp, context_parallel_size=1,
        data_parallel_size=world // tp, world_size=world, sequence_parallel=tp > 1, params_dtype=torch.float32,
        bf16=False, fp16=False, use_distributed_optimizer=False, ckpt_format=fmt, transformer_impl="local")


def dist_load(model, root: str) -> None:
    load_dist(model, root, 1)


dirname = rank_dirname      # Megatron-LM's get_checkpoint_name for this rank


def logits(model) -> torch.Tensor:
    tokens = (torch.arange(SEQ) * 37 + 11).remainder(VOCAB).unsqueeze(0)
    pos = torch.arange(SEQ).unsqueeze(0)
    with torch.no_grad():
        mask = torch.triu(torch.ones(SEQ, SEQ), diagonal=1).bool()[None, None]   # True = masked
        return model(tokens, pos, mask).detach().clone()


def save(work: str, cases: list[str]) -> None:
    rank = torch.distributed.get_rank()
    for case in cases:
        (tp, ep, etp), *_ = CASES[case]
        init(tp, ep, etp)
        model = build(tp, ep, etp)
        root = os.path.join(work, case)
        save_dist(os.path.join(root, "dist"), 1, {
            "args": megatron_args(tp, ep, etp, "torch_dist"), "checkpoint_version": 3.0, "iteration": 1,
            "model": model.sharded_state_dict(metadata=dist_metadata())})
        out = logits(model)
        if rank == 0:
            torch.save(out, os.path.join(root, "logits_A.pt"))
        save_legacy(os.path.join(root, "A"), 1, lambda: {
            "args": megatron_args(tp, ep, etp), "checkpoint_version": 3.0, "iteration": 1,
            "model": model.state_dict_for_save_checkpoint()})


def check(work: str, report: str, cases: list[str]) -> None:
    results = {}
    for case in cases:
        _, (tp, ep, etp), *_ = CASES[case]
        init(tp, ep, etp)
        root = os.path.join(work, case)
        ref = build(tp, ep, etp, seed=99)           # other init: every byte must come from the load
        dist_load(ref, os.path.join(root, "dist"))
        expected = ref.state_dict_for_save_checkpoint()
        a = torch.load(os.path.join(root, "logits_A.pt"))
        res = {"rank": torch.distributed.get_rank(), "dir": dirname(),
               "tensors": sum(torch.is_tensor(v) for v in expected.values()),
               "logit_diff_ref": float((logits(ref) - a).abs().max())}
        for name, fmt in LOADED:
            mine = build(tp, ep, etp, seed=7)
            r = res[name] = check_converted(mine, os.path.join(root, name), fmt, 1, expected)
            r["logit_diff"] = float((logits(mine) - a).abs().max())
        results[case] = gather(res)
    write_result(report, results)


def main(argv: list[str]) -> None:
    run_command(argv, {"save": lambda out, *a: save(out, list(a)),
                       "check": lambda root, report, *a: check(root, report, list(a))})


if __name__ == "__main__":
    main(sys.argv[1:])
