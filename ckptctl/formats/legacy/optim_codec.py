"""The optimizer codec of legacy rank files (DESIGN §6): decode a rank file's optimizer state into per-parameter
tensors and encode it back for a target layout.

* **distributed** (`--use-distributed-optimizer`): `distrib_optim.pt` beside each model file, the flat fp32
  buffers (`ckptctl.optstate.flat`), plus the `optimizer` key of `model_optim_rng.pt` (param groups with
  `step`, no tensors).
* **adam** (non-distributed): the `optimizer` key holds torch's state dict (FP32Optimizer: bare
  `{"state", "param_groups"}`; Float16Optimizer: `{"optimizer", "fp32_from_fp16_params", ["grad_scaler"]}`)
  whose state indices are rebuilt from the model dict order and Megatron's standard param groups.

Supported: the coalesced `distrib_optim.pt` format (Megatron-LM since 2024-02, checked against
megatron-core 0.19.2 / Megatron-LM core_v0.19.0) with torch Adam/AdamW state. Refused with a one-line
error: non-coalesced (older) files, per-DP `optim.pt`, layer-wise optimizer files, precision-aware
optimizer state, other optimizers, non-standard param groups, merging sub-optimizers whose param
groups, steps or grad scalers disagree.
"""
from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import torch

from ckptctl.errors import BadInput
from ckptctl.formats.legacy.optim_kind import DIST_FILE, variant
from ckptctl.optstate.buffers import Buffer
from ckptctl.optstate.flat import _sub_list, decode_distributed, encode_distributed
from ckptctl.optstate.params import ADAM_KEYS, HALF, Param, group_of, optim_piece, split_subs
from ckptctl.optstate.state import Context, FileState, fill_tensors, target_comps
from ckptctl.optstate.subopt import merge_subs, strip_adam
from ckptctl.reshard.stream import Budget, LazyTensor, save_streaming
from ckptctl.storage.build import lazy_tensor
from ckptctl.storage.pickles import load_pt


def detect(sd: dict, model_path: Path) -> dict | None:
    """The optimizer variant of a rank file (`optim_kind.variant`), or None when it carries no optimizer
    state; with several sub-optimizers, whether they can be merged."""
    d = variant(sd, model_path)
    return None if d is None else _with_merge(d, sd["optimizer"], model_path)


def _with_merge(d: dict, opt, model_path: Path) -> dict:
    """With several sub-optimizers: why they could not be merged into one (None: they can), checked
    before any output is written."""
    if d["subs"] > 1:
        subs = opt if d["kind"] == "distributed" else [strip_adam(s, d["variant"]) for s in opt]
        try:
            merge_subs(subs, d["kind"], str(model_path))
            d["merge"] = None
        except BadInput as e:
            d["merge"] = str(e)
    return d


def decode_adam(obj, subs: list[list[Param]], variant: str, args: dict, where: str) -> tuple[dict, list, float | None]:
    out: dict[int, dict] = {}
    commons, steps = [], set()
    for s, (state, params) in enumerate(zip(_sub_list(obj, len(subs), where), subs)):
        inner = state if variant == "fp32" else state["optimizer"]
        groups = inner["param_groups"]
        members: list[list[Param]] = [[] for _ in groups]
        for p in params:
            members[group_of(p, groups, args, where)].append(p)
        masters = state.get("fp32_from_fp16_params") if variant == "float16" else None
        for gi, (g, ps) in enumerate(zip(groups, members)):
            if len(g["params"]) != len(ps):
                raise BadInput(f"{where}: param group {gi} lists {len(g['params'])} params, the model places "
                               f"{len(ps)} there (non-standard param groups are not supported)")
            halves = [p for p in ps if p.dtype in HALF]
            if masters is not None and len(masters[gi]) != len(halves):
                raise BadInput(f"{where}: fp32_from_fp16_params group {gi} has {len(masters[gi])} tensors, "
                               f"expected {len(halves)}")
            for idx, p in zip(g["params"], ps):
                st = inner["state"].get(idx)
                if st is None:
                    raise BadInput(f"{where}: no optimizer state for parameter {p.key!r} (index {idx}); "
                                   "partial state (params never stepped) is not supported")
                comp = {}
                for k in ADAM_KEYS:
                    t = st.get(k)
                    if t is None or tuple(t.shape) != p.shape:
                        raise BadInput(f"{where}: state {k} of {p.key!r} has shape "
                                       f"{None if t is None else tuple(t.shape)}, the parameter {p.shape}")
                    if t.dtype != torch.float32:
                        raise BadInput(f"{where}: state {k} of {p.key!r} is {t.dtype}; only fp32 state is supported")
                    comp[k] = t
                if set(st) - {"step", *ADAM_KEYS}:
                    raise BadInput(f"{where}: state of {p.key!r} has keys {sorted(st)}; only Adam is supported")
                if "step" in st:
                    steps.add(float(st["step"]))
                out[p.index] = comp
            if masters is not None:
                for p, m in zip(halves, masters[gi]):
                    if tuple(m.shape) != p.shape:
                        raise BadInput(f"{where}: fp32 master of {p.key!r} has shape {tuple(m.shape)}, expected {p.shape}")
                    out[p.index]["param"] = m
        commons.append(strip_adam(state, variant))
    if len(steps) > 1:
        raise BadInput(f"{where}: parameters have different Adam steps {sorted(steps)}")
    return out, commons, (steps.pop() if steps else None)


def decode_file(ctx: Context, fp, sd: dict, model_path: Path) -> FileState:
    """Per-parameter fp32 state of one source rank file."""
    where = str(model_path)
    params = ctx.params(fp)
    subs, bufs = ctx.layout_of(fp, params)
    kind = ctx.info["kind"]
    if "optimizer" not in sd:
        raise BadInput(f"{where}: no 'optimizer' entry while other rank files have one")
    if kind == "distributed":
        dpath = Path(model_path).parent / DIST_FILE
        tensors = decode_distributed(load_pt(dpath), subs, bufs, str(dpath)) if dpath.is_file() else {}
        common = sd["optimizer"]
        steps = {g.get("step") for c in _sub_list(common, len(subs), where) if c for g in c["optimizer"]["param_groups"]}
        step = next(iter(steps)) if len(steps) == 1 else None
        return FileState(tensors, common, step)
    tensors, commons, step = decode_adam(sd["optimizer"], subs, ctx.info["variant"], ctx.args, where)
    if ctx.info["variant"] == "float16":
        for p in params:   # fp32 params of a mixed-precision model are their own master
            if p.dtype == "float32":
                tensors[p.index]["param"] = sd[p.chunk][p.key]
    return FileState(tensors, {"subs": commons, "step": step}, step)


def encode_adam(ctx: Context, fp, params, tensors: dict[int, dict], common: dict) -> object:
    subs = split_subs(params, ctx.info["subs"])
    step = common.get("step")
    out = []
    for sub, c in zip(subs, common["subs"]):
        groups = c["param_groups"]
        members: list[list[Param]] = [[] for _ in groups]
        for p in sub:
            members[group_of(p, groups, ctx.args, fp.dirname)].append(p)
        state, pgs, masters, idx = {}, [], [], 0
        for g, ps in zip(groups, members):
            ids = []
            for p in ps:
                st = {}
                if step is not None:
                    st["step"] = torch.tensor(step, dtype=torch.float32)
                st["exp_avg"] = tensors[p.index]["exp_avg"]
                st["exp_avg_sq"] = tensors[p.index]["exp_avg_sq"]
                state[idx] = st
                ids.append(idx)
                idx += 1
            pgs.append({**g, "params": ids})
            masters.append([tensors[p.index]["param"] for p in ps if p.dtype in HALF])
        inner = {"state": state, "param_groups": pgs}
        if ctx.info["variant"] == "fp32":
            out.append(inner)
        else:
            sd = {"optimizer": inner}
            if "grad_scaler" in c:
                sd["grad_scaler"] = c["grad_scaler"]
            sd["fp32_from_fp16_params"] = masters
            out.append(sd)
    return out[0] if len(out) == 1 else out


def write_target(ctx: Context, reader, fp, sd: dict, out_dir: Path, common, block: int | None = None) -> int:
    """Put the optimizer state of one target file into `sd` (and distrib_optim.pt into out_dir). The
    distributed optimizer's flat buffers are streamed from the store in blocks of `block` bytes (default:
    the default budget's), like the model file's tensors; Adam state is built in memory."""
    params = ctx.params(fp)
    comps = target_comps(ctx.info)
    if ctx.info["kind"] == "distributed":
        block = block or Budget(None).block
        save_streaming(encode_distributed(ctx, fp, params, lazy_flat(_param_filler(reader, fp, block), block)),
                       Path(out_dir) / DIST_FILE, exact=True)
        sd["optimizer"] = common
    else:
        sd["optimizer"] = encode_adam(ctx, fp, params, fill_tensors(reader, fp, params, comps), common)
    return sum(p.numel * 4 * len(comps) for p in params)


class _Uncounted:
    """Progress for the parameters' lazy reads: write_target's caller counts the file's state once."""

    def add(self, n: int, force: bool = False) -> None:
        pass


def _param_filler(reader, fp, block: int):
    """`lazy_flat`'s fill_param: one parameter's state of one component, read like its weight (the same
    pieces on the component's store array, `fill_tensors`' reads) block by block (`storage.build`)."""
    def fill(p: Param, comp: str, write) -> None:
        item = fp.tensors[p.index]
        state = replace(item, dtype="float32", pieces=tuple(optim_piece(q, comp) for q in item.pieces))
        lazy_tensor(reader, state, block, _Uncounted()).fill(write)
    return fill


def lazy_flat(fill_param, block: int):
    """`encode_distributed`'s `flat` as LazyTensors written in buffer order when the file is saved:
    `fill_param(param, comp, write)` writes one parameter's state (in blocks of at most `block` bytes),
    the gaps between parameters are written as zeros, so no buffer is ever whole in memory."""
    def flat(buf: Buffer, comp: str) -> LazyTensor:
        def fill(write):
            at = 0
            for p, off in sorted(zip(buf.params, buf.offsets), key=lambda x: x[1]):
                if off < at or off + p.numel > buf.numel_unpadded:
                    raise RuntimeError(f"parameter {p.key!r} at [{off}, {off + p.numel}) overlaps its neighbour "
                                       f"or leaves the buffer of {buf.numel_unpadded}")
                _zeros(write, off - at, block)
                fill_param(p, comp, write)
                at = off + p.numel
            _zeros(write, buf.numel_unpadded - at, block)
        return LazyTensor((buf.numel_unpadded,), torch.float32, fill)
    return flat


def _zeros(write, n: int, block: int) -> None:
    step = max(1, min(n, block // 4))
    z = torch.zeros(step, dtype=torch.float32)
    for a in range(0, n, step):
        write(z[:min(step, n - a)])
