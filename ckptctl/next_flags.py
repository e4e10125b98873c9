"""The Megatron-LM arguments that load a converted checkpoint ("next: ..." after convert)."""
from __future__ import annotations

from ckptctl.formats import registry


def megatron_flags(dst: str, layout, out_fmt: str, optimizer: dict | None, optimizer_kept: bool,
                   rng: str) -> dict | None:
    """`layout`: the target layout; `optimizer`: the source's optimizer info (None: none);
    `rng`: convert's --rng. Returns {"flags": [...], "line": str, "world_size": int}; None for a format
    Megatron-LM does not load (Hugging Face)."""
    if not registry.megatron_name(out_fmt):
        return None
    f = ["--load", str(dst), "--tensor-model-parallel-size", str(layout.tp),
         "--pipeline-model-parallel-size", str(layout.pp)]
    if layout.vpp > 1:
        f += ["--num-virtual-stages-per-pipeline-rank", str(layout.vpp)]
    if layout.ep > 1 or layout.etp is not None:
        f += ["--expert-model-parallel-size", str(layout.ep), "--expert-tensor-parallel-size", str(layout.expert_tp)]
    split = getattr(layout, "split", None)   # a target pipeline split given to convert (ckptctl.pipeline)
    if split is not None and not split.even:
        if split.layout is not None:
            f += ["--pipeline-model-parallel-layout", split.layout]
        for flag, v in (("--decoder-first-pipeline-num-layers", split.first),
                        ("--decoder-last-pipeline-num-layers", split.last)):
            if v is not None:
                f += [flag, str(v)]
    if layout.cp > 1:
        f += ["--context-parallel-size", str(layout.cp)]
    f += ["--ckpt-format", registry.megatron_name(out_fmt)]
    if optimizer and optimizer_kept:
        if optimizer.get("kind") == "distributed":
            f += ["--use-distributed-optimizer"]
    else:
        f += ["--no-load-optim"]
    if rng == "drop":
        f += ["--no-load-rng"]
    return {"flags": f, "line": " ".join(f), "world_size": layout.world,
            "note": f"launch on {layout.world} GPUs (data-parallel size {layout.dp}); model flags "
                    "(--num-layers, --hidden-size, ...) as in the source run"}
