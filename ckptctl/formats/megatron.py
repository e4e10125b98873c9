"""Megatron-LM conventions every format of it shares: the tracker file, iteration directory names, the
`args` namespace (layout read from it, rewritten for a target) and the policy for non-model state."""
from __future__ import annotations

import argparse
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
# "rng": per-rank RNG states (--rng); "optimizer": optimizer state (see ckptctl.optim).
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


