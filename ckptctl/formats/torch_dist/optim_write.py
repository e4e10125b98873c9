"""Writing torch_dist optimizer state (target workers): the chunks, objects and common-state entries
megatron-core 0.19.2 saves for the target layout, after the sub-optimizer structure is rebuilt for it
(`ckptctl.optstate.subopt.TargetState`), as for legacy output."""
from __future__ import annotations

import argparse
import dataclasses

import torch

from ckptctl.formats.torch_dist.optim_info import (ADAM_NAMES, DIST_NAMES, STATE, adam_dist_common, bucket_key,
                                                       chained, check_sharding, group_index, object_key, sub_dp)
from ckptctl.formats.torch_dist.optim_read import bucket_layouts
from ckptctl.formats.torch_dist.target import DistChunk
from ckptctl.optstate.buffers import writer_flags
from ckptctl.optstate.params import HALF, optim_piece
from ckptctl.optstate.state import fill_tensors
from ckptctl.optstate.subopt import TargetState
from ckptctl.reshard.plan import plan_target
from ckptctl.storage.objects import OPTIM_COMMON, get_object


@dataclasses.dataclass
class Additions:
    """What the torch_dist writer adds for the optimizer: chunks, objects and common-state entries."""

    chunks: list
    objects: list                       # (DCP object name, value)
    sharding: str | None                # None: the non-distributed optimizer
    optimizer_common: object            # distributed: the legacy `optimizer` entry (a list: sub-optimizers)

    def common(self, common: dict) -> dict:
        out = dict(common)
        if self.sharding is None:       # megatron-core's form already; no sharding type recorded
            out["optimizer"] = self.optimizer_common
            return out
        subs = self.optimizer_common if isinstance(self.optimizer_common, list) else [self.optimizer_common]
        per = [{**sub, "param_state_sharding_type": self.sharding} if self.sharding == "fully_reshardable"
               else {"param_state_sharding_type": self.sharding} for sub in subs]
        out["optimizer"] = per[0] if len(per) == 1 else dict(enumerate(per))
        meta = dict(out.get("content_metadata") or {}, distrib_optim_sharding_type=self.sharding)
        if self.sharding == "fully_reshardable":
            meta["distrib_optim_fully_reshardable_mem_efficient"] = False
        out["content_metadata"] = meta
        if "args" in out:
            a = dict(vars(out["args"]))
            a["use_distributed_optimizer"] = True
            a["dist_ckpt_optim_fully_reshardable"] = self.sharding == "fully_reshardable"
            out["args"] = argparse.Namespace(**a)
        return out


def target_additions(job, store, attrs, family, cfg, dst, encs, model_chunks: list) -> Additions | None:
    """The optimizer part of a torch_dist target (None when the store has no optimizer state). The
    sub-optimizer structure is rebuilt for the target first (`TargetState`), as for legacy output."""
    info = attrs.get("optimizer")
    if not info or OPTIM_COMMON not in encs:
        return None
    files = plan_target(family, cfg, dst, attrs["manifest"], attrs["arrays"], set(encs))
    tside = TargetState(family, cfg, dst, info, get_object(store, OPTIM_COMMON, encs[OPTIM_COMMON]), files)
    if info["kind"] == "adam":
        chunks = model_space_chunks(tside.ctx, files, model_chunks, info["comps"], ADAM_NAMES, half_masters=True)
        return Additions(chunks, [], None, adam_dist_common(tside.common, info["variant"]))
    sharding = check_sharding(getattr(job, "optim_sharding", None))
    if sharding == "fully_reshardable":
        chunks = model_space_chunks(tside.ctx, files, model_chunks, info["comps"])
        return Additions(chunks, [], sharding, tside.common)
    chunks, objects = [], []
    for fp in files:
        c, o = bucket_space(tside.ctx, fp, info["comps"], tside.common)
        chunks += c
        objects += o
    return Additions(chunks, objects, sharding, tside.common)


def model_space_chunks(ctx, files: list, model_chunks: list, comps, names: dict = DIST_NAMES,
                       half_masters: bool = False) -> list:
    """The model's chunks again, per state component (`optimizer.state.<names[comp]>.<key>`), read from the
    optim arrays: `fully_reshardable`, and the non-distributed optimizer (whose fp32 parameters are their
    own master: `half_masters`, no `fp32_param` for them)."""
    stateful = {p.array for fp in files for prm in ctx.params(fp) for p in fp.tensors[prm.index].pieces}
    # a key is stateful when its chunks read stateful arrays; chunks without parts (vocab rows the target
    # adds) are zeros, in the optimizer state too
    keys = {c.fqn for c in model_chunks if c.parts and all(p.array in stateful for p in c.parts)}
    out = []
    for comp in comps:
        for c in model_chunks:
            if c.fqn not in keys or (half_masters and comp == "param" and c.dtype not in HALF):
                continue
            out.append(dataclasses.replace(c, fqn=f"{STATE}{names[comp]}.{c.fqn}", dtype="float32",
                                           parts=tuple(optim_piece(p, comp) for p in c.parts)))
    return out


@dataclasses.dataclass(frozen=True)
class FlatChunk(DistChunk):
    """A `dp_reshardable` chunk: elements [lo, hi) of one parameter's flattened local state (or zeros
    for an alignment gap when `param` is None)."""

    fp: object = None
    param: object = None
    comp: str = ""
    lo: int = 0
    hi: int = 0

    def tensor(self, store) -> torch.Tensor:
        if self.param is None:
            return torch.zeros(self.sizes, dtype=torch.float32)
        t = fill_tensors(store, self.fp, [self.param], [self.comp])[self.param.index][self.comp]
        return t.reshape(-1)[self.lo:self.hi].clone()


def bucket_space(ctx, fp, comps, ocommon) -> tuple[list, list]:
    """`dp_reshardable` chunks and objects of one target rank file, as megatron-core saves them: per
    sub-optimizer this file writes (`writer_flags`: one file per model-parallel rank of each), per
    bucket and DP rank, a chunk per parameter slice and per gap, up to the bucket's unpadded end; keys
    prefixed `chained_<i>.` with several sub-optimizers."""
    params = ctx.params(fp)
    subs, bufs = ctx.layout_of(fp, params)
    n = len(bufs)
    flags = writer_flags(ctx.layout, fp) if n > 1 else (True,)
    commons = ocommon if isinstance(ocommon, list) else [ocommon]
    total = sum(p.numel for p in params)
    chunks, objects = [], []
    for si, sub_bufs in enumerate(bufs):
        if flags[si]:
            c, o = _sub_bucket_space(ctx, fp, si, sub_bufs, comps, commons[si], chained(si, n), total)
            chunks += c
            objects += o
    return chunks, objects


def _sub_bucket_space(ctx, fp, si: int, bufs: list, comps, ocommon: dict, pre: str, total: int) -> tuple[list, list]:
    dp = sub_dp(ctx.layout, si)
    g = group_index(ctx.layout, fp.coord, si)
    chunks, numel, unpadded = [], [], []
    for gi, (buf, (where, buckets)) in enumerate(zip(bufs, bucket_layouts(ctx, fp, bufs, fp.coord.pp, si, total))):
        dkey = tuple(getattr(torch, d) for d in buf.dtypes)
        numel.append({dkey: [end - start for start, end, _ in buckets]})
        unpadded.append({dkey: [n for _, _, n in buckets]})
        for b, (bstart, bend, n) in enumerate(buckets):
            local = (bend - bstart) // dp
            members = sorted((s - bstart, e - bstart, p) for (s, e, bi), p in zip(where, buf.params) if bi == b)
            spans = []                      # (bucket offset, length, param or None, start inside the param)
            for r in range(dp):
                lo, hi = r * local, (r + 1) * local
                mine = [(max(s, lo), min(e, hi), p, max(s, lo) - s) for s, e, p in members if min(e, hi) > max(s, lo)]
                cur = lo
                for s, e, p, off in mine + [(hi, hi, None, 0)]:
                    if s > cur and cur < n:
                        spans.append((cur, s - cur, None, 0))
                    if p is not None:
                        spans.append((s, e - s, p, off))
                    cur = max(cur, e)
            for comp in comps:
                key = bucket_key(g, gi, buf.dtypes, b, comp, pre)
                for off, size, p, poff in spans:
                    chunks.append(FlatChunk(key, (n,), (off,), (size,), "float32", (), fp, p, comp, poff, poff + size))
    objects = [(object_key(g, "optimizer", pre), ocommon["optimizer"])]
    if "grad_scaler" in ocommon:
        objects.append((object_key(g, "grad_scaler", pre), ocommon["grad_scaler"]))
    objects += [(object_key(g, "per_bucket_numel", pre), numel),
                (object_key(g, "per_bucket_numel_unpadded", pre), unpadded)]
    return chunks, objects
