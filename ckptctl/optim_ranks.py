"""verify: the optimizer's param-group hyperparameters and step must agree on every rank file of one
checkpoint. Convert (and verify's state comparison) take them from one rank; a step or learning rate
changed on one rank only would otherwise go unseen.

Read from each rank file: every `param_groups` list anywhere under its `optimizer` entry (plain Adam,
Float16Optimizer, the distributed optimizer, several sub-optimizers), without the `params` indices; and
every per-parameter `step` in `state` (torch's Adam keeps it there). Groups are matched across ranks by
their hyperparameters other than `lr` and `step` (weight-decay and lr multipliers differ between groups,
and a rank may hold fewer groups).
"""
from __future__ import annotations

import torch

from ckptctl.core.diff import Difference
from ckptctl.storage.pickles import load_pt


def _scalar(v):
    if torch.is_tensor(v):
        return v.item() if v.numel() == 1 else tuple(v.reshape(-1).tolist())
    return v


def _collect(obj, path: str, groups: list, steps: set) -> None:
    if isinstance(obj, dict):
        for k, v in obj.items():
            if k == "param_groups" and isinstance(v, list):
                for i, g in enumerate(v):
                    if isinstance(g, dict):
                        groups.append((f"{path}.param_groups[{i}]", {a: _scalar(b) for a, b in g.items() if a != "params"}))
            elif k == "state" and isinstance(v, dict):
                for s in v.values():
                    if isinstance(s, dict) and "step" in s:
                        steps.add(repr(_scalar(s["step"])))
            elif isinstance(v, (dict, list)):
                _collect(v, f"{path}.{k}", groups, steps)
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            _collect(v, f"{path}[{i}]", groups, steps)


def _signature(g: dict) -> str:
    return repr(sorted((k, repr(v)) for k, v in g.items() if k not in ("lr", "step")))


def rank_state(sd: dict) -> tuple[dict, dict]:
    """(group signature -> {"lr", "step"}, {"state.step": values}) of one rank file's optimizer."""
    groups, steps = [], set()
    _collect(sd.get("optimizer"), "optimizer", groups, steps)
    out = {}
    for _, g in groups:
        out.setdefault(_signature(g), {"lr": repr(g.get("lr")), "step": repr(g.get("step"))})
    return out, {"state.step": sorted(steps)}


def check(src, rep, side: str) -> None:
    """Append a Difference to `rep` for each hyperparameter or step that differs between rank files."""
    files = getattr(src.ckpt, "file_list", None)   # legacy rank files; torch_dist keeps one common copy
    if not files or not getattr(src, "optim", None):
        return
    first = None
    for _, path in files:
        sd = load_pt(path)
        groups, steps = rank_state(sd)
        del sd
        name = f"{path.parent.name}"
        if first is None:
            first = (name, groups, steps)
            continue
        fname, fgroups, fsteps = first
        for sig, vals in groups.items():
            ref = fgroups.get(sig)
            if ref is None:
                continue
            for k in ("lr", "step"):
                if vals[k] != ref[k]:
                    rep.differences.append(Difference(f"optimizer.param_groups.{k}", f"differs between rank files of "
                                                      f"{side}: {ref[k]} in {fname}, {vals[k]} in {name}",
                                                      where=f"{side}: {name}"))
        if steps["state.step"] and fsteps["state.step"] and steps != fsteps:
            rep.differences.append(Difference("optimizer.state.step", f"differs between rank files of {side}: "
                                              f"{fsteps['state.step']} in {fname}, {steps['state.step']} in {name}",
                                              where=f"{side}: {name}"))
