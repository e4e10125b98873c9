"""The distributed optimizer's flat buffer layout, recomputed as megatron-core 0.19.2's
`DistributedOptimizer._compute_per_buffer_param_layout` does it: params in reverse, starts aligned to 64
elements, buckets closed at `bucket_size` and around `shared_embedding` params, bucket ends padded to
lcm(DP, 128) and stripped in the saved tensors."""
from __future__ import annotations

import math
from dataclasses import dataclass

from ckptctl.optstate.params import Param


def _pad(x: int, d: int) -> int:
    return -(-x // d) * d


def buffer_layout(numels: list[int], shared: list[bool], bucket_size: int | None, dp: int,
                  pad_high: bool = False) -> tuple[list[tuple[int, int, int]], list[tuple[int, int, int]]]:
    """Per param (in forward order) (start, end, bucket) in buffer coordinates, and per bucket
    (start, padded end, numel_unpadded). Params are laid out in reverse (backprop) order."""
    div = math.lcm(dp, 128, 65536) if pad_high else math.lcm(dp, 128)
    where: dict[int, tuple[int, int, int]] = {}
    buckets: list[tuple[int, int, int]] = []
    start = bstart = 0
    members = 0

    def close(end: int, bstart: int) -> int:
        padded = _pad(end, div)
        buckets.append((bstart, padded, end - bstart))
        return padded

    for i in reversed(range(len(numels))):
        start = _pad(start, 64)
        if shared[i] and members:
            bstart = close(start, bstart)
            members = 0
            start = bstart
        end = start + numels[i]
        where[i] = (start, end, len(buckets))
        members += 1
        if (bucket_size is not None and end - bstart >= bucket_size) or shared[i]:
            bstart = close(end, bstart)
            members = 0
            start = bstart
        else:
            start = end
    if members:
        close(end, bstart)
    return [where[i] for i in range(len(numels))], buckets


def saved_offsets(numels, shared, bucket_size, dp, pad_high=False) -> tuple[list[int], int]:
    """Offsets of each param in the saved (end-padding-stripped) tensor, and its numel_unpadded."""
    where, buckets = buffer_layout(numels, shared, bucket_size, dp, pad_high)
    base, acc = [], 0
    for b in buckets:
        base.append(acc)
        acc += b[2]
    return [base[b] + s - buckets[b][0] for s, _, b in where], acc


def grad_dtype(args: dict, dtype: str) -> str:
    return "float32" if args.get("accumulate_allreduce_grads_in_fp32") else dtype


def bucket_size_of(args: dict, layout, pp_rank: int, chunk_index: int, num_parameters: int) -> int | None:
    """Megatron-LM core_v0.19.0 `resolve_ddp_bucket_size` and per-chunk bucketing rules."""
    if not args.get("overlap_grad_reduce"):
        return None
    if pp_rank > 0 or chunk_index > 0 or args.get("overlap_param_gather_with_optimizer_step"):
        return None
    if args.get("ddp_num_buckets"):
        return num_parameters // int(args["ddp_num_buckets"])
    if args.get("ddp_bucket_size"):
        return int(args["ddp_bucket_size"])
    return max(40_000_000, 1_000_000 * layout.dp * layout.cp)


@dataclass
class Buffer:
    chunk_index: int
    dtypes: tuple[str, str]
    params: list[Param]
    offsets: list[int]
    numel_unpadded: int


def buffers(sub: list[Param], chunks: tuple[str, ...], args: dict, layout, pp_rank: int, expert: bool,
            num_parameters: int) -> list[Buffer]:
    """A sub-optimizer's buffers in gbuf_idx order: chunk by chunk, then by (param, grad) dtype."""
    out = []
    dp = layout.edp if expert else layout.dp * layout.cp
    for v, chunk in enumerate(chunks):
        groups: dict[tuple[str, str], list[Param]] = {}
        for p in sub:
            if p.chunk == chunk:
                groups.setdefault((p.dtype, grad_dtype(args, p.dtype)), []).append(p)
        bs = bucket_size_of(args, layout, pp_rank, v, num_parameters)
        for dt, ps in groups.items():
            offs, n = saved_offsets([p.numel for p in ps], [p.shared for p in ps], bs, dp,
                                    bool(args.get("ddp_pad_buckets_for_high_nccl_busbw")))
            out.append(Buffer(v, dt, ps, offs, n))
    return out


def writer_flags(layout, fp) -> tuple[bool, bool]:
    """Whether the rank writing this directory is DP-rank 0 of the dense / expert sub-optimizer.

    From the rank grids' arithmetic, not a loop over the world (8,192 ranks x 8,192 files at frontier
    scale): within a stage the local rank x has dense tp = x % TP and dp = x // (TP*CP), and on the expert
    grid ep = (x // ETP) % EP and edp = x // (ETP*EP). The directory's ranks are x = tp + k*TP; dp = 0 means
    x < TP*CP, edp = 0 means x < ETP*EP, so only those few candidates are looked at."""
    tp, pp, ep = fp.coord.tp, fp.coord.pp, fp.coord.ep
    if not (0 <= tp < layout.tp and 0 <= pp < layout.pp):
        return False, False
    etp_n, ep_n = layout.expert_tp, layout.ep
    stage = layout.world // layout.pp

    def any_rank(limit: int) -> bool:
        return any((x // etp_n) % ep_n == ep for x in range(tp, min(limit, stage), layout.tp))
    return any_rank(layout.tp * layout.cp), any_rank(etp_n * ep_n)
