"""megatron-core oracle for the Hugging Face export and import (one torchrun launch, world 2, gloo, CPU).

    torchrun --nproc-per-node 2 tests/mcore/hf_models.py run WORK CASE...

Per case (a Llama-, Qwen2-, Qwen3-, Mixtral-, Qwen2-MoE- or Qwen3-MoE-style GPTModel, local spec, RoPE, RMSNorm, SwiGLU):
1. at layout A, megatron-core builds the model (every parameter distinct: norms, biases and the router
   drawn again, equal on the ranks that replicate them), writes Megatron-LM's legacy files (WORK/CASE/A),
   the same weights with dist_checkpointing.save (WORK/CASE/dist) and the forward logits over the true
   vocabulary on a fixed batch (WORK/CASE/logits.pt);
2. rank 0 runs ckptctl in this process: A -> Hugging Face (WORK/CASE/hf), then HF -> Megatron legacy at
   layout B (WORK/CASE/B);
3. at layout B megatron-core builds the model twice: one filled by its own reshard of WORK/CASE/dist (the
   expected tensors), one loading ckptctl's WORK/CASE/B files strictly; raw bytes compared; forward
   logits at B compared with A's.
Rank 0 writes WORK/result.json. The transformers side (from_pretrained, logits) runs in pytest.
"""
from __future__ import annotations

import json
import os
import sys
import traceback
import zlib

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import job  # noqa: E402
from cpu import compare_state, dist_metadata, gather, init_parallel, load_dist, save_dist, save_legacy  # noqa: E402

BASE = dict(num_layers=2, hidden_size=64, num_attention_heads=8, num_query_groups=2, ffn_hidden_size=96,
            swiglu=True, tied=False, vocab_size=100, make_vocab_size_divisible_by=128, seq_length=12,
            max_position_embeddings=64, position_embedding_type="rope", normalization="RMSNorm",
            add_bias_linear=False, qk_layernorm=False, dtype="float32", args_vocab_size=True,
            qkv_bias=False, experts=0, moe_ffn=32, shared_ffn=0, topk=2)
# case -> (config, layout A, layout B); layouts as {tp, pp, ep}
CASES = {
    "llama": (dict(BASE), dict(tp=2, pp=1, ep=1), dict(tp=1, pp=2, ep=1)),
    "qwen2": (dict(BASE, qkv_bias=True, tied=True, num_query_groups=4), dict(tp=1, pp=2, ep=1), dict(tp=2, pp=1, ep=1)),
    "mixtral": (dict(BASE, experts=4), dict(tp=1, pp=1, ep=2), dict(tp=2, pp=1, ep=1)),
    "qwen2_moe": (dict(BASE, experts=4, shared_ffn=48, qkv_bias=True), dict(tp=2, pp=1, ep=1), dict(tp=1, pp=1, ep=2)),
    "qwen3": (dict(BASE, qk_layernorm=True), dict(tp=2, pp=1, ep=1), dict(tp=1, pp=2, ep=1)),
    "qwen3_moe": (dict(BASE, experts=4, qk_layernorm=True), dict(tp=1, pp=1, ep=2), dict(tp=2, pp=1, ep=1)),
}
ITER = job.ITERATION


def lay_of(d: dict) -> dict:
    return dict(tp=d["tp"], pp=d["pp"], vpp=1, dp=2 // (d["tp"] * d["pp"]), ep=d["ep"], world=2)


def transformer_config(cfg: dict, lay: dict):
    """job.py's config plus what the HF architectures need: QKV-only biases, experts, shared experts."""
    import dataclasses
    t = job_transformer_config(cfg, lay)
    extra = dict(add_qkv_bias=cfg["qkv_bias"] or cfg["add_bias_linear"])
    if cfg["experts"]:
        extra.update(num_moe_experts=cfg["experts"], moe_ffn_hidden_size=cfg["moe_ffn"], moe_router_topk=cfg["topk"],
                     moe_token_dispatcher_type="allgather", moe_router_load_balancing_type="none",
                     moe_aux_loss_coeff=0.0, expert_model_parallel_size=lay["ep"],
                     expert_tensor_parallel_size=lay["tp"], sequence_parallel=lay["tp"] > 1)
        if cfg["shared_ffn"]:
            extra.update(moe_shared_expert_intermediate_size=cfg["shared_ffn"], moe_shared_expert_gate=True)
    return dataclasses.replace(t, **extra)


job_transformer_config, job.transformer_config = job.transformer_config, transformer_config


def args_for(cfg: dict, lay: dict, fmt: str):
    a = job.megatron_args(cfg, lay, fmt)
    a.add_qkv_bias = cfg["qkv_bias"] or cfg["add_bias_linear"]
    a.expert_model_parallel_size, a.expert_tensor_parallel_size = lay["ep"], lay["tp"]
    a.data_parallel_size = lay["dp"]
    if cfg["experts"]:
        vars(a).update(num_experts=cfg["experts"], moe_ffn_hidden_size=cfg["moe_ffn"], moe_router_topk=cfg["topk"],
                       moe_grouped_gemm=False, moe_router_pre_softmax=False, moe_router_score_function="softmax",
                       moe_token_dispatcher_type="allgather", sequence_parallel=lay["tp"] > 1)
        if cfg["shared_ffn"]:
            vars(a).update(moe_shared_expert_intermediate_size=cfg["shared_ffn"], moe_shared_expert_gate=True)
    return a


def build(cfg: dict, lay: dict, seed: int, distinct: bool):
    """One GPTModel for this rank's stage. `distinct`: every parameter gets values of its own (norms,
    biases, router, shared-expert gate redrawn from a generator seeded by name, so replicas agree;
    sharded ones by name and rank)."""
    from megatron.core import parallel_state as ps
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.models.gpt.gpt_model import GPTModel

    tconf = transformer_config(cfg, lay)
    spec = get_gpt_layer_local_spec(num_experts=cfg["experts"] or None, moe_grouped_gemm=False,
                                    normalization=cfg["normalization"], qk_layernorm=cfg["qk_layernorm"])
    torch.manual_seed(seed + 100 * ps.get_pipeline_model_parallel_rank())
    model = GPTModel(tconf, spec, vocab_size=job.padded_vocab(cfg, lay["tp"]),
                     max_sequence_length=cfg["max_position_embeddings"],
                     pre_process=ps.is_pipeline_first_stage(), post_process=ps.is_pipeline_last_stage(),
                     parallel_output=False, share_embeddings_and_output_weights=cfg["tied"],
                     position_embedding_type="rope")
    model.eval()
    if distinct:
        pp, tp = ps.get_pipeline_model_parallel_rank(), ps.get_tensor_model_parallel_rank()
        ep = ps.get_expert_model_parallel_rank()
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name.startswith(("embedding.word_embeddings", "output_layer")):
                    continue
                split = getattr(p, "tensor_model_parallel", False)
                expert = ".experts." in name
                tag = f"{name}|pp{pp}" + (f"|tp{tp}" if split else "") + (f"|ep{ep}" if expert else "")
                g = torch.Generator().manual_seed(zlib.crc32(tag.encode()) + seed)
                noise = torch.randn(p.shape, generator=g) * 0.1
                if split or expert:
                    p.add_(noise)
                else:    # replicated: drawn afresh so every rank holds the same bytes
                    p.copy_(noise + (1.0 if "norm" in name else 0.0))
    return model


def compare(got: dict, exp: dict, cfg: dict) -> tuple[list, dict]:
    """compare_state, but the vocab tensors' rows past the true vocabulary (trained padding rows in A, not
    in HF) are checked apart: ckptctl's must be zero. Returns (mismatches, {key: padding rows all zero})."""
    from megatron.core import parallel_state as ps
    V, tp = cfg["vocab_size"], ps.get_tensor_model_parallel_rank()
    got, exp = dict(got), dict(exp)     # the caller loads `got` afterwards
    vocab = [k for k in exp if k.endswith(("word_embeddings.weight", "output_layer.weight"))]
    bad, padding = [], {}
    for k in vocab:
        if k in got and k in exp and got[k].shape == exp[k].shape:
            n = exp[k].shape[0]
            keep = max(0, min(n, V - tp * n))     # local rows below the true vocab
            g, e = got.pop(k), exp.pop(k)
            got[k + "[:V]"], exp[k + "[:V]"] = g[:keep], e[:keep]
            padding[k] = bool((g[keep:] == 0).all())
    bad += compare_state(got, exp)[0]
    return bad, padding


def ckptctl_side(root: str, lay_b: dict) -> list[str]:
    """Rank 0: Megatron A -> HF -> Megatron B with ckptctl, in this process (no workers). ckptctl must not
    see torchrun's variables (it would join this launch's process group, and convert refuses under torchrun)."""
    saved = dict(os.environ)
    for k in list(os.environ):
        if k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK", "GROUP_WORLD_SIZE", "ROLE_RANK",
                 "ROLE_WORLD_SIZE", "ROLE_NAME", "MASTER_ADDR", "MASTER_PORT") or k.startswith("TORCHELASTIC_"):
            del os.environ[k]
    try:
        from ckptctl.hf import export_checkpoint
        from ckptctl.hf import import_hf
        from ckptctl.layout import Layout
        export_checkpoint(os.path.join(root, "A"), os.path.join(root, "hf"), nproc=0, shard_size="200KB")
        import_hf(os.path.join(root, "hf"), os.path.join(root, "B"),
                  Layout(tp=lay_b["tp"], pp=lay_b["pp"], ep=lay_b["ep"], dp=lay_b["dp"]))
        return []
    except Exception:  # noqa: BLE001 - reported in the result
        return [traceback.format_exc()[-2000:]]
    finally:
        os.environ.clear()
        os.environ.update(saved)


def run(work: str, *cases: str) -> None:
    rank = torch.distributed.get_rank()
    results = {}
    for case in cases:
        cfg, a, b = CASES[case]
        la, lb = lay_of(a), lay_of(b)
        root = os.path.join(work, case)
        os.makedirs(root, exist_ok=True)
        init_parallel(tp=la["tp"], pp=la["pp"], ep=la["ep"])
        model = build(cfg, la, 1234, distinct=True)
        save_legacy(os.path.join(root, "A"), ITER, lambda: {
            "args": args_for(cfg, la, "torch"), "checkpoint_version": 3.0, "iteration": ITER,
            "model": model.state_dict_for_save_checkpoint()})
        save_dist(os.path.join(root, "dist"), ITER, {"args": args_for(cfg, la, "torch_dist"), "checkpoint_version": 3.0,
                                                     "iteration": ITER, "model": model.sharded_state_dict(metadata=dist_metadata())})
        out = job.forward([model], cfg, la)
        from megatron.core import parallel_state as ps
        if out is not None and ps.get_tensor_model_parallel_rank() == 0 and ps.get_data_parallel_rank() == 0:
            torch.save({"logits": out, "tokens": job.fixed_input(cfg)[0]}, os.path.join(root, "logits.pt"))
        torch.distributed.barrier()
        errors = ckptctl_side(root, lb) if rank == 0 else []
        errors = sum(gather(errors), [])
        res = {"errors": errors, "rank": rank}
        if not errors:
            init_parallel(tp=lb["tp"], pp=lb["pp"], ep=lb["ep"])
            ref = build(cfg, lb, 99, distinct=False)
            load_dist(ref, os.path.join(root, "dist"), ITER)
            mine = build(cfg, lb, 7, distinct=False)
            from cpu import rank_dirname
            path = os.path.join(root, "B", "release", rank_dirname(), "model_optim_rng.pt")
            res["file"] = os.path.relpath(path, root)
            try:
                sd = torch.load(path, map_location="cpu", weights_only=False)
                res["mismatch"], res["padding"] = compare(sd["model"], ref.state_dict_for_save_checkpoint(), cfg)
                mine.load_state_dict(sd["model"], strict=True)
                res["strict_load"] = "ok"
                res["args"] = {k: getattr(sd["args"], k, None) for k in (
                    "tensor_model_parallel_size", "pipeline_model_parallel_size", "expert_model_parallel_size",
                    "padded_vocab_size", "normalization", "position_embedding_type", "swiglu", "add_qkv_bias",
                    "num_query_groups", "rotary_base", "num_experts", "moe_shared_expert_gate")}
            except Exception as e:  # noqa: BLE001
                res["strict_load"] = str(e)[:500]
            out_b = job.forward([mine], cfg, lb)
            if out_b is not None:
                want = torch.load(os.path.join(root, "logits.pt"))["logits"]
                res["logits_b_vs_a"] = float((out_b - want).abs().max())
        results[case] = gather(res)
    if rank == 0:
        with open(os.path.join(work, "result.json"), "w") as f:
            json.dump(results, f, indent=1, default=str)


if __name__ == "__main__":
    from cpu import run_command
    run_command(sys.argv[1:], {"run": run})
