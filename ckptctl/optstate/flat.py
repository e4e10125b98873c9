"""The flat buffers of megatron-core's DistributedOptimizer, decoded to and encoded from per-parameter state.

`get_parameter_state_dp_zero` form (0.19.2): `{"buckets_coalesced": True, gbuf_idx: {(param_dtype,
grad_dtype): {"param", "exp_avg", "exp_avg_sq", "numel_unpadded"}}}`, a list when there are several
sub-optimizers. A legacy `distrib_optim.pt` holds exactly this; torch_dist's `dp_reshardable` buckets,
concatenated, give it too, so both formats decode through here.
"""
from __future__ import annotations

import torch

from ckptctl.errors import BadInput
from ckptctl.optstate.buffers import Buffer, writer_flags
from ckptctl.optstate.params import ADAM_KEYS, Param


def _dt(name: str) -> torch.dtype:
    return getattr(torch, name)


def _entry(state: dict, dt: tuple[str, str], where: str) -> dict:
    for k, v in state.items():
        if isinstance(k, tuple) and len(k) == 2 and tuple(str(x).removeprefix("torch.") for x in k) == dt:
            return v
    raise BadInput(f"{where}: no buffer for dtypes {dt} (found {[k for k in state]})")


def _sub_list(obj, n: int, where: str) -> list:
    if n == 1:
        if isinstance(obj, list):
            raise BadInput(f"{where}: holds {len(obj)} sub-optimizers, the layout has 1")
        return [obj]
    if not isinstance(obj, list) or len(obj) != n:
        raise BadInput(f"{where}: expected a list of {n} sub-optimizer states")
    return obj


def decode_distributed(obj, subs: list[list[Param]], bufs: list[list[Buffer]], where: str) -> dict[int, dict]:
    out: dict[int, dict] = {}
    for s, state in enumerate(_sub_list(obj, len(subs), where)):
        if state is None:
            continue
        if not isinstance(state, dict) or state.get("buckets_coalesced") is not True:
            raise BadInput(f"{where}: not the coalesced distrib_optim.pt format (Megatron-LM before 2024-02); "
                           "re-save it with --ckpt-convert-update-legacy-dist-opt-format")
        for g, buf in enumerate(bufs[s]):
            if g not in state:
                raise BadInput(f"{where}: no buffer {g} (sub-optimizer {s}); the model has {len(bufs[s])}")
            e = _entry(state[g], buf.dtypes, where)
            if int(e.get("numel_unpadded", -1)) != buf.numel_unpadded:
                raise BadInput(f"{where}: buffer {g} holds numel_unpadded={e.get('numel_unpadded')}, the model "
                               f"layout gives {buf.numel_unpadded} (unsupported Megatron version or bucket settings)")
            comps = [k for k in e if k != "numel_unpadded"]
            if comps[:1] != ["param"] or not set(comps[1:]) <= set(ADAM_KEYS):
                raise BadInput(f"{where}: buffer {g} holds {comps}; only Adam state (param, exp_avg, exp_avg_sq) is supported")
            for c in comps:
                if e[c].numel() != buf.numel_unpadded or e[c].dtype != torch.float32:
                    raise BadInput(f"{where}: buffer {g} {c}: {e[c].numel()} {e[c].dtype}, expected "
                                   f"{buf.numel_unpadded} float32")
            for p, off in zip(buf.params, buf.offsets):
                if off + p.numel > buf.numel_unpadded:
                    raise BadInput(f"{where}: parameter {p.key!r} does not fit buffer {g}")
                out[p.index] = {c: e[c][off:off + p.numel].view(p.shape) for c in comps}
    return out


def encode_distributed(ctx, fp, params, flat) -> object:
    """A target file's `distrib_optim.pt` object; `flat(buf, comp)` gives one component's flat buffer
    (`numel_unpadded` fp32: each parameter at its offset, zeros between): the legacy writer's `lazy_flat`
    streams it."""
    subs, bufs = ctx.layout_of(fp, params)
    flags = writer_flags(ctx.layout, fp)
    states = []
    for s, sub_bufs in enumerate(bufs):
        if len(bufs) > 1 and not flags[s]:
            states.append(None)
            continue
        state: dict = {"buckets_coalesced": True}
        for g, buf in enumerate(sub_bufs):
            e = {c: flat(buf, c) for c in ctx.info["comps"]}
            e["numel_unpadded"] = buf.numel_unpadded
            state[g] = {(_dt(buf.dtypes[0]), _dt(buf.dtypes[1])): e}
        states.append(state)
    return states[0] if len(states) == 1 else states
