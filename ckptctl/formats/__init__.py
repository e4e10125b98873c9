"""Checkpoint formats: readers and writers around the planner.

A source format gives the planner's `SourcePlan` and opens its units (rank files for legacy, DCP chunks
for torch_dist). A unit answers `tensor(item)`, `object(item)`, `rng()` (store slot -> RNG state),
`common()` (the non-model state the store keeps) and `dropped()` (state not converted).
"""
from __future__ import annotations

from pathlib import Path

LEGACY = "legacy"
TORCH_DIST = "torch_dist"
FORMATS = (LEGACY, TORCH_DIST)
# Megatron-LM's `--ckpt-format` name of each format (its legacy format is "torch").
MEGATRON_NAME = {LEGACY: "torch", TORCH_DIST: "torch_dist"}
_ALIASES = {"torch": LEGACY}


def canonical(name: str | None) -> str | None:
    """A format name as ckptctl spells it: Megatron's `torch` is our `legacy`; unknown names pass through
    (the caller refuses them naming the choices)."""
    return None if name is None else _ALIASES.get(name.strip().lower(), name.strip().lower())


def source_plan(fmt: str, family, cfg, layout, inventories: list, dist: dict | None):
    """The pure source plan of a checkpoint from its inspected key lists (no I/O)."""
    if fmt == TORCH_DIST:
        from ckptctl.formats import torch_dist
        return torch_dist.plan_source(family, cfg, layout, dist["index"], dist["spec"])
    from ckptctl.layout import FileCoord
    from ckptctl.reshard.plan import Inventory, plan_source
    return plan_source(family, cfg, layout, [
        Inventory(FileCoord(**i["coord"]), i["dirname"],
                  {c: [(k, tuple(s) if s is not None else None, d) for k, s, d in e] for c, e in i["chunks"].items()})
        for i in inventories])


def unit_opener(fmt: str, layout, inventories: list, dist: dict | None):
    """A function FilePlan -> opened unit."""
    if fmt == TORCH_DIST:
        from ckptctl.formats import torch_dist
        return lambda fp: torch_dist.DistUnit(Path(dist["iter_dir"]), dist["index"], layout, fp)
    from ckptctl.formats import legacy
    paths = {i["dirname"]: Path(i["path"]) for i in inventories}
    return lambda fp: legacy.LegacyUnit(legacy.load_pt(paths[fp.dirname]), fp.dirname)


def optim_source(fmt: str, family, cfg, layout, info: dict, plan, dist: dict | None):
    """The source phase's optimizer side: legacy rank files (`optim.SourceSide`) or torch_dist state."""
    if fmt == TORCH_DIST:
        from ckptctl.formats.torch_dist_optim import DistOptimSource
        return DistOptimSource(family, cfg, layout, info, plan, dist)
    from ckptctl import optim
    return optim.SourceSide(family, cfg, layout, info, plan)
