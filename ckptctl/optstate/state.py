"""Per-file optimizer state, format-free: the decoding context of a rank file, which store arrays hold the
state and which source file writes which region, the checkpoint-wide variant (`inspect_info`), and the
convert report's policy line."""
from __future__ import annotations

from dataclasses import dataclass, field

from ckptctl.errors import BadInput
from ckptctl.optstate.buffers import buffers
from ckptctl.optstate.order import ModelOrder
from ckptctl.optstate.params import Param, comps_of, file_params, n_subs, optim_array, optim_piece, split_subs, subs_for

ARG_KEYS = ("use_distributed_optimizer", "accumulate_allreduce_grads_in_fp32", "overlap_grad_reduce",
            "overlap_param_gather_with_optimizer_step", "ddp_num_buckets", "ddp_bucket_size",
            "ddp_pad_buckets_for_high_nccl_busbw", "decoupled_lr", "apply_wd_to_qk_layernorm", "optimizer")


@dataclass
class FileState:
    """Decoded optimizer state of one rank file."""

    tensors: dict[int, dict[str, torch.Tensor]]     # Param.index -> {comp: local fp32 tensor}
    common: object                                  # the `optimizer` key without per-param tensors
    step: float | None


@dataclass
class Context:
    """What decoding and encoding a rank file's optimizer state needs (pure data)."""

    family: object
    cfg: object
    layout: object
    args: dict
    info: dict                  # {"kind", "variant", "subs", "comps"}
    # per FilePlan (by identity) its params, and per global key what file_params derives from it: a plan of
    # 8,192 files asks three times per file (order check, state indices, owned pieces)
    _params: dict = field(default_factory=dict, compare=False, repr=False)
    _keys: dict = field(default_factory=dict, compare=False, repr=False)

    def params(self, fp) -> list[Param]:
        hit = self._params.get(id(fp))
        if hit is None or hit[0] is not fp:
            hit = self._params[id(fp)] = (fp, file_params(self.family, self.cfg, self.layout, fp, self._keys))
        return list(hit[1])

    def layout_of(self, fp, params: list[Param]):
        subs = split_subs(params, self.info["subs"])
        total = sum(p.numel for p in params)
        bufs = [buffers(sub, fp.chunks, self.args, self.layout, fp.coord.pp, s == 1, total)
                for s, sub in enumerate(subs)]
        return subs, bufs


def check_order(ctx: Context, files: list) -> None:
    """Each rank file's parameters, chunk by chunk, in the order megatron-core's modules give them
    (`param_order`): the order that places state in flat buffers and Adam indices comes from the model,
    and a file listing its parameters otherwise is refused, naming the parameter."""
    order = ModelOrder(ctx.family, ctx.cfg)
    checked: set[tuple] = set()     # the TP ranks of one stage list the same keys: each sequence checked once
    for fp in files:
        params = ctx.params(fp)
        for chunk in fp.chunks:
            seq = tuple(p.gkey for p in params if p.chunk == chunk)
            if seq not in checked:
                order.check_sequence(list(seq), f"{fp.dirname}/{chunk}")
                checked.add(seq)


def target_comps(info: dict) -> tuple[str, ...]:
    return tuple(info["comps"])


def fill_tensors(reader, fp, params: list[Param], comps) -> dict[int, dict]:
    """Per-parameter state of a target file, read from the store through the weight's pieces."""
    import torch   # here, not at the top: inspect (`inspect_info`) runs without torch
    out = {}
    tensors = fp.tensors
    for p in params:
        t = tensors[p.index]
        d = {}
        vol = p.numel
        for c in comps:
            buf = (torch.empty if t.covered == vol else torch.zeros)(p.shape, dtype=torch.float32)
            for piece in t.pieces:
                q = optim_piece(piece, c)
                buf[q.local.slices] = reader.read(q.array, q.gbox).reshape(q.local.sizes)
            d[c] = buf
        out[p.index] = d
    return out


def plan_arrays(plan, comps) -> dict[str, dict]:
    """Store arrays for the optimizer state: fp32, the weight array's shape and chunk grid."""
    stateful = set()
    for fp in plan.files:
        for t in fp.tensors:
            for p in t.pieces:
                stateful.add(p.array)
    out = {}
    for a, spec in plan.arrays.items():
        if a in stateful:
            for c in comps:
                out[optim_array(a, c)] = {**spec, "dtype": "float32", "vocab": spec.get("vocab", False)}
    return out


def owned_pieces(ctx: Context, plan, has_state: list[set[int]]) -> list[dict[int, tuple[bool, ...]]]:
    """Per source file: Param.index -> which pieces this file writes (first file holding the state)."""
    seen: dict[str, set] = {}
    out = []
    for fp, have in zip(plan.files, has_state):
        mine = {}
        for p in ctx.params(fp):
            if p.index not in have:
                continue
            flags = []
            for piece in fp.tensors[p.index].pieces:
                s = seen.setdefault(piece.array, set())
                flags.append(piece.gbox not in s)
                s.add(piece.gbox)
            mine[p.index] = tuple(flags)
        out.append(mine)
    return out


def state_indices(ctx: Context, fp, kind_file_has: tuple[bool, bool]) -> set[int]:
    """Which params of a source file have state in it (distributed: only sub-optimizers written there)."""
    params = ctx.params(fp)
    if ctx.info["kind"] != "distributed" or ctx.info["subs"] == 1:
        return {p.index for p in params}
    dense, expert = kind_file_has
    return {p.index for p in params if (expert if p.expert else dense)}


def inspect_info(detected: list, paths: list, cfg, layout, args: dict) -> dict | None:
    """One optimizer variant for the whole checkpoint (or None); refuse mixtures and mismatches."""
    kinds = {None if d is None else (d["kind"], d["variant"], d["subs"]) for d in detected}
    if len(kinds) > 1:
        raise BadInput(f"rank files disagree on optimizer state: {paths[0]} vs {paths[[None if d is None else (d['kind'], d['variant'], d['subs']) for d in detected].index(sorted(kinds, key=str)[-1])]}")
    d = detected[0]
    if d is None:
        return None
    if args.get("optimizer", "adam") not in ("adam", None):
        raise BadInput(f"optimizer {args.get('optimizer')!r}: only Adam state is supported")
    if d["subs"] != n_subs(cfg, layout):
        raise BadInput(f"{paths[0]}: {d['subs']} sub-optimizers, layout {layout} has {n_subs(cfg, layout)}")
    merge = next((x["merge"] for x in detected if x.get("merge")), None)
    return {**d, "merge": merge, "experts": bool(cfg.num_experts), "comps": comps_of(d["kind"], d["variant"]),
            "args": {k: args.get(k) for k in ARG_KEYS if args.get(k) is not None}}


def store_attrs(info: dict) -> dict:
    return {k: info.get(k) for k in ("kind", "variant", "subs", "comps", "args", "merge", "experts")}


def policy_text(info: dict | None, src_layout, dst_layout, src_form: str, dst_form: str,
                indices_rebuilt: bool) -> str:
    """The convert report's optimizer line. `src_form` / `dst_form`: what the source and target formats hold
    of this state (`Format.optim_form`); `indices_rebuilt`: the target keeps Adam state indices."""
    if info is None:
        return "absent in the source: none written"
    comps = ", ".join(info["comps"])
    what = src_form if dst_form == src_form else f"{src_form}, written as {dst_form}"
    dp = "" if dst_layout is None else f"; re-encoded for {dst_layout} (DP={dst_layout.dp})"
    n = info["subs"] if dst_layout is None else subs_for(bool(info.get("experts")), dst_layout)
    subs = "" if n == info["subs"] else (
        f"; sub-optimizers {info['subs']} -> {n}: " + ("the expert param groups (equal to the dense ones, step "
                                                       "included) merged into the dense ones" if n < info["subs"]
                                                       else "each param group, its step and grad scaler copied to the "
                                                       "dense and expert sub-optimizers whose params it held"))
    return (f"converted: {what}; {comps} resharded per parameter like its weight (vocab padding rows "
            f"follow the weight rows, rows the target adds are zero); step and param-group "
            f"hyperparameters copied{', param indices rebuilt' if indices_rebuilt else ''}{dp}{subs}")


def write_owned(store, fp, owned: dict[int, tuple[bool, ...]], tensors: dict[int, dict], comps, progress,
                where: str) -> None:
    """The source phase's store writes of one decoded rank: each region this file owns, per component (the
    same loop for every format: its pieces are the weight's, the array names mapped)."""
    for idx, flags in owned.items():
        if idx not in tensors:
            raise BadInput(f"{where}: no optimizer state for {fp.tensors[idx].key!r}")
        for piece, mine in zip(fp.tensors[idx].pieces, flags):
            if not mine:
                continue
            for c in comps:
                q = optim_piece(piece, c)
                part = tensors[idx][c][q.local.slices]
                store.write(q.array, q.gbox, part.contiguous())
                if progress is not None:
                    progress.add(part.numel() * 4)
