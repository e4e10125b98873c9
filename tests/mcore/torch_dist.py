"""megatron-core oracle for the torch_dist format (run under torchrun, gloo, CPU).

    torchrun --nproc-per-node N tests/mcore/torch_dist.py save OUT --layout tp2pp2 [--tied]
        build a GPT (GLU, GQA, local spec) at the layout, save it with dist_checkpointing.save as
        Megatron-LM lays out a torch_dist checkpoint (tracker, iter dir, common args, RNG objects)
    torchrun --nproc-per-node N tests/mcore/torch_dist.py check REPORT --layout tp2pp1 \
            --ref DIST [--dist DIST2 ...] [--legacy LEGACY ...]
        build the model at the layout; load REF with dist_checkpointing.load (megatron-core reshards
        it itself: the expected local tensors); load every other torch_dist checkpoint the same way and
        every legacy checkpoint strictly (load_state_dict(strict=True)); compare raw bytes; with PP=1
        also the forward logits. Rank 0 writes REPORT (JSON).

Uses none of ckptctl's sharding rules: the expectations come from megatron-core alone.
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from cpu import compare_state, cpu_patches, dist_metadata, gather, save_dist, write_result  # noqa: E402

HIDDEN, HEADS, GROUPS, FFN, LAYERS, VOCAB, SEQ = 32, 8, 2, 64, 4, 250, 16


def parse_layout(text: str) -> tuple[int, int]:
    import re
    m = re.fullmatch(r"tp(\d+)pp(\d+)", text)
    return int(m.group(1)), int(m.group(2))


def padded(tp: int) -> int:
    m = 128 * tp
    return (VOCAB + m - 1) // m * m


def build(tp: int, pp: int, tied: bool, seed: int = 1234):
    from megatron.core import parallel_state as ps
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.models.gpt.gpt_model import GPTModel
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed
    from megatron.core.transformer.transformer_config import TransformerConfig

    if not ps.model_parallel_is_initialized():
        ps.initialize_model_parallel(tp, pp)
    model_parallel_cuda_manual_seed(seed, inference_rng_tracker=True)
    cfg = TransformerConfig(
        num_layers=LAYERS, hidden_size=HIDDEN, num_attention_heads=HEADS, num_query_groups=GROUPS,
        ffn_hidden_size=FFN, gated_linear_unit=True, activation_func=torch.nn.functional.silu,
        add_bias_linear=True, use_cpu_initialization=True, perform_initialization=True,
        tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp, pipeline_dtype=torch.float32,
        hidden_dropout=0.0, attention_dropout=0.0, init_method_std=0.05)
    model = GPTModel(cfg, get_gpt_layer_local_spec(), vocab_size=padded(tp), max_sequence_length=SEQ,
                     pre_process=ps.is_pipeline_first_stage(), post_process=ps.is_pipeline_last_stage(),
                     share_embeddings_and_output_weights=tied, parallel_output=False)
    model.eval()
    return model


def megatron_args(tp: int, pp: int, tied: bool) -> argparse.Namespace:
    """The args fields Megatron-LM saves that describe this model (names as in arguments.py)."""
    return argparse.Namespace(
        num_layers=LAYERS, hidden_size=HIDDEN, ffn_hidden_size=FFN, num_attention_heads=HEADS,
        num_query_groups=GROUPS, group_query_attention=True, kv_channels=HIDDEN // HEADS, swiglu=True,
        untie_embeddings_and_output_weights=not tied, padded_vocab_size=padded(tp), vocab_size=VOCAB,
        make_vocab_size_divisible_by=128, max_position_embeddings=SEQ, seq_length=SEQ,
        position_embedding_type="learned_absolute", normalization="LayerNorm", add_bias_linear=True,
        transformer_impl="local", ckpt_format="torch_dist", tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=pp, virtual_pipeline_model_parallel_size=None,
        expert_model_parallel_size=1, context_parallel_size=1, data_parallel_size=1,
        world_size=tp * pp, sequence_parallel=False, params_dtype=torch.float32)


def save(out: str, tp: int, pp: int, tied: bool) -> None:
    from megatron.core import parallel_state as ps
    from megatron.core.dist_checkpointing.mapping import ShardedObject

    model = build(tp, pp, tied)
    g = torch.Generator().manual_seed(100 + torch.distributed.get_rank())
    rng = [{"random_rng_state": (3, tuple(range(5)), None), "torch_rng_state": torch.randint(0, 255, (16,), generator=g,
                                                                                       dtype=torch.uint8),
            "rng_tracker_states": {}}]
    save_dist(out, 10, {
        "args": megatron_args(tp, pp, tied), "checkpoint_version": 3.0, "iteration": 10,
        "opt_param_scheduler": {"max_lr": 3e-4, "num_steps": 10}, "num_floating_point_operations_so_far": 5.0,
        "model": model.sharded_state_dict(metadata=dist_metadata()),
        "rng_state": ShardedObject("rng_state", rng, (pp, tp), (ps.get_pipeline_model_parallel_rank(),
                                                                ps.get_tensor_model_parallel_rank()), replica_id=0)})


def logits(model) -> list:
    tokens = torch.arange(SEQ).remainder(VOCAB).unsqueeze(0)
    pos = torch.arange(SEQ).unsqueeze(0)
    with torch.no_grad():
        mask = torch.triu(torch.ones(SEQ, SEQ), diagonal=1).bool()[None, None]   # True = masked
        out = model(tokens, pos, mask)
    return out[..., :VOCAB].reshape(-1).tolist()


def check(report: str, tp: int, pp: int, tied: bool, ref: str, dists: list[str], legacies: list[str]) -> None:
    from megatron.core import dist_checkpointing
    from megatron.core import parallel_state as ps

    def dist_load(path):
        m = build(tp, pp, tied)
        it = os.path.join(path, "iter_0000010")
        loaded = dist_checkpointing.load({"model": m.sharded_state_dict()}, it, strict="raise_unexpected")
        m.load_state_dict(loaded["model"], strict=True)
        return m, loaded

    ref_model, ref_loaded = dist_load(ref)
    expected = {k: v for k, v in ref_model.state_dict().items() if torch.is_tensor(v)}
    result = {"rank": torch.distributed.get_rank(), "tensors": len(expected), "mismatch": [], "loaded": []}

    def compare(name, model):
        if pp == 1:
            result.setdefault("logits", {})[name] = logits(model)
        got = {k: v for k, v in model.state_dict().items() if torch.is_tensor(v)}
        result["mismatch"] += [f"{name}: {b}" for b in compare_state(got, expected)[0]]
        result["loaded"].append(name)

    for d in dists:
        m, loaded = dist_load(d)
        compare(d, m)
        if loaded.get("iteration") != 10 or not hasattr(loaded.get("args"), "num_layers"):
            result["mismatch"].append(f"{d}: common state lacks iteration/args")
    tp_rank, pp_rank = ps.get_tensor_model_parallel_rank(), ps.get_pipeline_model_parallel_rank()
    for d in legacies:
        m = build(tp, pp, tied)
        name = f"mp_rank_{tp_rank:02d}" + (f"_{pp_rank:03d}" if pp > 1 else "")
        sd = torch.load(os.path.join(d, "iter_0000010", name, "model_optim_rng.pt"), weights_only=False)
        m.load_state_dict(sd["model"], strict=True)
        compare(d, m)
    if pp == 1:
        result.setdefault("logits", {})["ref"] = logits(ref_model)
    write_result(report, gather(result))


def main(argv: list[str]) -> None:
    p = argparse.ArgumentParser()
    p.add_argument("cmd", choices=["save", "check"])
    p.add_argument("out")
    p.add_argument("--layout", required=True)
    p.add_argument("--tied", action="store_true")
    p.add_argument("--ref")
    p.add_argument("--dist", action="append", default=[])
    p.add_argument("--legacy", action="append", default=[])
    a = p.parse_args(argv)
    cpu_patches()
    torch.distributed.init_process_group("gloo")
    tp, pp = parse_layout(a.layout)
    if a.cmd == "save":
        save(a.out, tp, pp, a.tied)
    else:
        check(a.out, tp, pp, a.tied, a.ref, a.dist, a.legacy)
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1:])
