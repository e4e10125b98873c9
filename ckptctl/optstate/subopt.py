"""Sub-optimizer structure (megatron-core 0.19.2's ChainedOptimizer): dense, plus expert when EP>1 or
ETP!=TP. EP/ETP changes that add or remove the expert sub-optimizer carry the state (`restructure`):
splitting copies each source param group (and its `step`, grad scaler) into the sub-optimizer(s) whose
params it held; merging requires every expert group to equal a dense group in every hyperparameter and
`step`, and the grad scalers to be equal.

`get_megatron_optimizer` builds param groups once over all params (`_get_param_groups`: key =
(standard overrides, is_expert_parallel), unified over all ranks, sorted with the no-override group
first), then gives the groups with is_expert_parallel=False to the dense sub-optimizer and the others
to the expert one. Hyperparameters of a group depend only on its overrides, never on EP, so the
expert group of an override equals the dense group of that override except for is_expert_parallel.
"""
from __future__ import annotations

from dataclasses import replace

from ckptctl.errors import BadInput
from ckptctl.optstate.params import group_of, n_subs
from ckptctl.optstate.state import Context


def strip_adam(state: dict, variant: str) -> dict:
    """The layout-free part of a non-distributed optimizer state dict (param groups without indices)."""
    inner = state if variant == "fp32" else state["optimizer"]
    out = {"param_groups": [{k: v for k, v in g.items() if k != "params"} for g in inner["param_groups"]]}
    if variant == "float16" and "grad_scaler" in state:
        out["grad_scaler"] = state["grad_scaler"]
    return out


GROUP_ROLE = ("params", "is_expert_parallel")      # not hyperparameters: where a group sits


def canon(obj) -> str:
    """A byte-exact, order-stable text form of plain state (tensors by dtype, shape and raw bytes)."""
    import torch   # here, not at the top: inspect's torch-free reader imports this module
    if torch.is_tensor(obj):
        t = obj.detach().contiguous().reshape(-1)
        raw = t.view(torch.uint8).numpy().tobytes().hex() if t.numel() else ""
        return f"tensor({t.dtype},{tuple(obj.shape)},{raw})"
    if isinstance(obj, dict):
        items = sorted(obj.items(), key=lambda kv: repr(kv[0]))
        return "{" + ",".join(f"{canon(k)}:{canon(v)}" for k, v in items) + "}"
    if isinstance(obj, (list, tuple)):
        inner = ",".join(canon(x) for x in obj)
        return f"[{inner}]" if isinstance(obj, list) else f"({inner})"
    if isinstance(obj, float):
        return obj.hex()
    return repr(obj)


def hyper(group: dict, *drop: str) -> dict:
    """A param group's hyperparameters (and `step`): what it is, not where it sits."""
    return {k: v for k, v in group.items() if k not in GROUP_ROLE and k not in drop}


def sub_states(common, kind: str) -> list[dict]:
    """The layout-free state of each sub-optimizer: distributed `{"optimizer": {"param_groups"},
    ["grad_scaler"]}`, adam `{"param_groups", ["grad_scaler"]}`."""
    if kind == "distributed":
        return list(common) if isinstance(common, list) else [common]
    return list(common["subs"])


def groups_of(sub: dict, kind: str) -> list[dict]:
    return sub["optimizer"]["param_groups"] if kind == "distributed" else sub["param_groups"]


def _with_groups(sub: dict, kind: str, groups: list[dict]) -> dict:
    if kind == "distributed":
        return {**sub, "optimizer": {**sub["optimizer"], "param_groups": groups}}
    return {**sub, "param_groups": groups}


def merge_subs(subs: list[dict], kind: str, where: str) -> list[dict]:
    """[dense, expert] -> [dense]: the expert params join the dense groups of their overrides. Each
    expert group must equal one dense group in every hyperparameter and `step`, and the grad scalers
    must be equal; otherwise the state cannot be represented by one sub-optimizer."""
    dense, expert = subs
    dgroups = groups_of(dense, kind)
    have = {canon(hyper(g)) for g in dgroups}
    for i, g in enumerate(groups_of(expert, kind)):
        if canon(hyper(g)) in have:
            continue
        same = [d for d in dgroups if canon(hyper(d, "step")) == canon(hyper(g, "step"))]
        if same:
            raise BadInput(f"{where}: the expert sub-optimizer is at step {g.get('step')!r}, the dense one at "
                           f"{same[0].get('step')!r}: they cannot be merged into one sub-optimizer "
                           "(target EP=1, ETP=TP); convert with --no-optimizer")
        brief = ", ".join(f"{k}={g[k]!r}" for k in ("wd_mult", "lr_mult", "max_lr", "min_lr", "lr") if k in g)
        raise BadInput(f"{where}: expert param group {i} ({brief}) has no dense param group with the same "
                       "hyperparameters: the sub-optimizers cannot be merged into one (target EP=1, ETP=TP); "
                       "convert with --no-optimizer")
    if canon(dense.get("grad_scaler")) != canon(expert.get("grad_scaler")):
        raise BadInput(f"{where}: the dense and expert sub-optimizers have different grad scaler states: they "
                       "cannot be merged into one (target EP=1, ETP=TP); convert with --no-optimizer")
    return [dense]


def split_sub(ctx, sub: dict, files: list) -> list[dict]:
    """[one] -> [dense, expert] for the target `ctx`: each sub-optimizer gets, in the source order, the
    groups its params were in (megatron-core keeps only groups that hold a param on some rank), with
    their hyperparameters, `step` and the grad scaler; the expert copies say is_expert_parallel=True."""
    kind = ctx.info["kind"]
    groups = groups_of(sub, kind)
    used: list[set[int]] = [set(), set()]
    for fp in files:
        for p in ctx.params(fp):
            used[p.expert].add(group_of(replace(p, expert=False), groups, ctx.args, fp.dirname))
    return [_with_groups(sub, kind, [{**groups[i], "is_expert_parallel": bool(s)} for i in sorted(used[s])])
            for s in (0, 1)]


def restructure(ctx, n_src: int, common, files: list | None):
    """The source's layout-free `common` optimizer object rebuilt for the target's sub-optimizer count."""
    kind, n = ctx.info["kind"], ctx.info["subs"]
    if common is None or n == n_src:
        return common
    subs = sub_states(common, kind)
    if n < n_src:
        new = merge_subs(subs, kind, "source optimizer state")
    else:
        if files is None:
            raise ValueError("splitting sub-optimizers needs the target's file plans")
        new = split_sub(ctx, subs[0], files)
    if kind == "distributed":
        return new[0] if len(new) == 1 else new
    return {**common, "subs": new}


class TargetState:
    """The source's optimizer state rebuilt for a target layout (its sub-optimizer structure: `restructure`).
    `common` None: only check that the state can be written (before any output); `files`: every target
    file plan, needed when the expert sub-optimizer is split off. Each format encodes `ctx` + `common`."""

    def __init__(self, family, cfg, layout, info: dict, common, files: list | None = None):
        tgt_subs = n_subs(cfg, layout)
        if tgt_subs < info["subs"] and info.get("merge"):
            raise BadInput(info["merge"])
        self.ctx = Context(family, cfg, layout, info.get("args", {}), {**info, "subs": tgt_subs})
        self.common = restructure(self.ctx, info["subs"], common, files)
