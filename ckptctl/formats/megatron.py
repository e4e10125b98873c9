"""Megatron-LM conventions every format of it shares: the tracker file, iteration directory names, the
`args` namespace (layout read from it, rewritten for a target) and the policy for non-model state."""
from __future__ import annotations

import argparse
import random
from pathlib import Path

from ckptctl.errors import BadInput
from ckptctl.layout import Layout
from ckptctl.storage.commit import write_text

TRACKER = "latest_checkpointed_iteration.txt"


def args_dict(args) -> dict:
    if isinstance(args, argparse.Namespace):
        return dict(vars(args))
    if isinstance(args, dict):
        return dict(args)
    raise BadInput(f"checkpoint 'args' is a {type(args).__name__}, expected an argparse.Namespace")


def layout_from_args(args: dict) -> Layout:
    etp = args.get("expert_tensor_parallel_size")
    tp = int(args.get("tensor_model_parallel_size") or 1)
    return Layout(
        tp=tp,
        pp=int(args.get("pipeline_model_parallel_size") or 1),
        vpp=int(args.get("virtual_pipeline_model_parallel_size") or 1),
        ep=int(args.get("expert_model_parallel_size") or 1),
        etp=None if etp is None or int(etp) == tp else int(etp),
        dp=int(args.get("data_parallel_size") or 1),
        cp=int(args.get("context_parallel_size") or 1),
    )


def iter_dirname(iteration) -> str:
    return "release" if iteration == "release" else f"iter_{int(iteration):07d}"


def write_tracker(root: Path, iteration) -> None:
    write_text(Path(root) / TRACKER, "release" if iteration == "release" else str(int(iteration)))


# --- what a rank file holds besides the model, and what happens to it (DESIGN §3) ----------------

# key -> policy. "reshard": the model chunks; "rewrite": args; "copy": taken from source rank 0;
# "rng": per-rank RNG states (--rng); "optimizer": optimizer state (see ckptctl.optstate).
TOP_LEVEL_POLICY = {
    "args": "rewrite",
    "checkpoint_version": "copy",
    "iteration": "copy",
    "opt_param_scheduler": "copy",
    "num_floating_point_operations_so_far": "copy",
    "rerun_state_machine": "copy",
    "rng_state": "rng",
    "optimizer": "optimizer",
}


def rewrite_args(args: dict, layout: Layout, padded_vocab: int | None, num_layers: int) -> dict:
    """The args a Megatron run at `layout` would have saved: parallel sizes and padded vocab."""
    a = dict(args)
    a["tensor_model_parallel_size"] = layout.tp
    a["pipeline_model_parallel_size"] = layout.pp
    a["virtual_pipeline_model_parallel_size"] = layout.vpp if layout.vpp > 1 else None
    if "num_layers_per_virtual_pipeline_stage" in a or layout.vpp > 1:
        a["num_layers_per_virtual_pipeline_stage"] = (num_layers // (layout.pp * layout.vpp)) if layout.vpp > 1 else None
    a["expert_model_parallel_size"] = layout.ep
    if "expert_tensor_parallel_size" in a or layout.etp is not None:
        a["expert_tensor_parallel_size"] = layout.expert_tp
    a["context_parallel_size"] = layout.cp
    a["data_parallel_size"] = layout.dp
    a["world_size"] = layout.world
    if padded_vocab is not None:
        a["padded_vocab_size"] = padded_vocab
    if layout.tp == 1 and a.get("sequence_parallel"):
        a["sequence_parallel"] = False
    from ckptctl.pipeline import with_split_args
    return with_split_args(a, layout)      # the target's pipeline split, when it carries its own


# --- what a fresh Megatron-LM run of a model saves besides its tensors (`ckptctl example`) -------------

def make_args(cfg, layout: Layout, dtype: str, seq: int, bias: bool) -> argparse.Namespace:
    """The Megatron-LM args fields that describe the model and the layout (names as arguments.py)."""
    import torch   # here, not at the top: inspect reads layouts and args from this module without torch
    return argparse.Namespace(
        num_layers=cfg.num_layers, hidden_size=cfg.hidden, ffn_hidden_size=cfg.ffn,
        num_attention_heads=cfg.heads, num_query_groups=cfg.groups, group_query_attention=cfg.groups != cfg.heads,
        kv_channels=cfg.kv_channels, swiglu=cfg.glu, untie_embeddings_and_output_weights=not cfg.tied,
        padded_vocab_size=cfg.padded_vocab, vocab_size=cfg.true_vocab,
        make_vocab_size_divisible_by=cfg.vocab_divisor, max_position_embeddings=seq, seq_length=seq,
        position_embedding_type=cfg.extra.get("position_embedding_type", "learned_absolute"),
        normalization=cfg.extra.get("normalization", "LayerNorm"), add_bias_linear=bias, add_qkv_bias=bool(cfg.extra.get("add_qkv_bias", bias)), qk_layernorm=bool(cfg.extra.get("qk_layernorm")),
        tensor_model_parallel_size=layout.tp, pipeline_model_parallel_size=layout.pp,
        virtual_pipeline_model_parallel_size=layout.vpp if layout.vpp > 1 else None,
        num_layers_per_virtual_pipeline_stage=cfg.num_layers // (layout.pp * layout.vpp) if layout.vpp > 1 else None,
        expert_model_parallel_size=layout.ep, expert_tensor_parallel_size=layout.expert_tp,
        context_parallel_size=layout.cp, data_parallel_size=layout.dp, world_size=layout.world,
        num_experts=cfg.num_experts or None, moe_ffn_hidden_size=cfg.moe_ffn,
        sequence_parallel=False, params_dtype=getattr(torch, dtype), bf16=dtype == "bfloat16",
        fp16=dtype == "float16", use_distributed_optimizer=False, ckpt_format="torch",
        **{k: v for k, v in cfg.extra.items() if k not in ("position_embedding_type", "add_bias_linear", "normalization",
                                                          "max_position_embeddings", "qk_layernorm",
                                                          "add_qkv_bias")},
    )


def rng_state(seed: int) -> dict:
    """An RNG state shaped like Megatron-LM's `get_rng_state` entry (without CUDA)."""
    import numpy as np
    import torch
    r = random.Random(seed)
    g = torch.Generator().manual_seed(seed)
    return {"random_rng_state": r.getstate(), "np_rng_state": np.random.RandomState(seed).get_state(),
            "torch_rng_state": g.get_state(), "cuda_rng_state": torch.zeros(16, dtype=torch.uint8),
            "rng_tracker_states": {}}
