"""Checkpoint formats as plug-ins: `base` (the interface every format implements), `registry` (finds the
format packages), `megatron` (conventions Megatron-LM's formats share), one package per format.

Only modules under `ckptctl/formats/` may name a format; everything else asks the registry.
"""
from __future__ import annotations

# Stage-1 entry points for callers not yet moved to the registry (removed with them).
LEGACY = "legacy"
TORCH_DIST = "torch_dist"
FORMATS = (LEGACY, TORCH_DIST)
MEGATRON_NAME = {LEGACY: "torch", TORCH_DIST: "torch_dist"}


def canonical(name):
    from ckptctl.formats import registry
    return registry.canonical(name)


def source_plan(fmt, family, cfg, layout, inventories, dist):
    from ckptctl.formats import registry
    return registry.get(fmt).source_plan(family, cfg, layout, inventories, dist)


def unit_opener(fmt, layout, inventories, dist):
    from ckptctl.formats import registry
    return registry.get(fmt).unit_opener(layout, inventories, dist)


def optim_source(fmt, family, cfg, layout, info, plan, dist):
    from ckptctl.formats import registry
    return registry.get(fmt).optim_source(family, cfg, layout, info, plan, dist)
