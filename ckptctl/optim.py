"""Optimizer state of Megatron-LM legacy checkpoints (DESIGN §6): decode, store, re-encode, verify.

Every trainable parameter's state becomes store arrays `optim/{param,exp_avg,exp_avg_sq}/<model array>`
(fp32), split exactly like the weight: the weight's `Piece`s with the array name mapped (`optim_piece`),
so no sharding rule is written twice and vocab padding rows follow the weight rows (rows the target adds
are zero, rows it drops are dropped).

Two encodings are read and written:

* **distributed** (`--use-distributed-optimizer`): `distrib_optim.pt` beside each model file, the flat
  fp32 buffers that megatron-core's `DistributedOptimizer.get_parameter_state_dp_zero` gathers
  (`{"buckets_coalesced": True, gbuf_idx: {(param_dtype, grad_dtype): {"param", "exp_avg",
  "exp_avg_sq", "numel_unpadded"}}}`; a list when there are several sub-optimizers), plus the
  `optimizer` key of `model_optim_rng.pt` (param groups with `step`, no tensors). The flat layout is
  recomputed here the way `DistributedOptimizer._compute_per_buffer_param_layout` does it (0.19.2):
  params in reverse, starts aligned to 64 elements, buckets closed at `bucket_size` and around
  `shared_embedding` params, bucket ends padded to lcm(DP, 128) and stripped in the file.
* **adam** (non-distributed): the `optimizer` key holds torch's state dict (FP32Optimizer: bare
  `{"state", "param_groups"}`; Float16Optimizer: `{"optimizer", "fp32_from_fp16_params", ["grad_scaler"]}`)
  whose state indices are rebuilt from the model dict order and Megatron's standard param groups.

The sub-optimizer structure (megatron-core's ChainedOptimizer: dense, plus expert when EP>1 or
ETP!=TP) is rebuilt for the target from the per-parameter arrays, so EP/ETP changes that add or remove
the expert sub-optimizer carry the state (`restructure`): splitting copies each source param group (and
its `step`, grad scaler) into the sub-optimizer(s) whose params it held; merging requires every expert
group to equal a dense group in every hyperparameter and `step`, and the grad scalers to be equal.

Supported: the coalesced `distrib_optim.pt` format (Megatron-LM since 2024-02, checked against
megatron-core 0.19.2 / Megatron-LM core_v0.19.0) with torch Adam/AdamW state. Refused with a one-line
error: non-coalesced (older) files, per-DP `optim.pt`, layer-wise optimizer files, precision-aware
optimizer state, other optimizers, non-standard param groups, merging sub-optimizers whose param
groups, steps or grad scalers disagree.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from ckptctl import optim_check
from ckptctl.errors import BadInput
from ckptctl.models.rules import Piece
from ckptctl.param_order import ModelOrder

OPTIM = "optim/"
DIST_FILE = "distrib_optim.pt"
ADAM_KEYS = ("exp_avg", "exp_avg_sq")
KINDS = ("none", "adam", "distributed")
EMBEDDING_OR_OUTPUT = ("embedding.word_embeddings.weight", "output_layer.weight")
HALF = ("bfloat16", "float16")


def optim_array(array: str, comp: str) -> str:
    """Store array of one state component of a model array: model/X -> optim/<comp>/X."""
    return f"{OPTIM}{comp}/{array.removeprefix('model/')}"


def optim_piece(p: Piece, comp: str) -> Piece:
    return Piece(p.local, optim_array(p.array, comp), p.gbox)


# --- which tensors are trainable parameters, and how Megatron groups them -----------------------

@dataclass(frozen=True)
class Param:
    index: int          # position of the TensorItem in fp.tensors
    chunk: str
    key: str
    gkey: str
    shape: tuple
    dtype: str
    expert: bool        # in the expert sub-optimizer (expert params with EP>1 or ETP!=TP)
    shared: bool        # megatron-core's `shared_embedding` attribute (own bucket)

    @property
    def numel(self) -> int:
        return math.prod(self.shape) if self.shape else 1


def expert_groups(layout) -> bool:
    """Expert params use their own DP group (and sub-optimizer) only with EP>1 or ETP!=TP (DESIGN §6.1)."""
    return layout.ep > 1 or layout.expert_tp != layout.tp


def file_params(family, cfg, layout, fp) -> list[Param]:
    """A rank file's trainable params in named_parameters() order (= its model dict order, DESIGN §6.2)."""
    tied = family.tied_copies(cfg)
    shared_keys = set(tied) | set(tied.values()) if layout.pp > 1 else set()
    eg = expert_groups(layout)
    out = []
    for i, t in enumerate(fp.tensors):
        loc = family.locate(t.gkey)
        if not family.optimizer_state(loc.rest):
            continue
        expert = eg and family.expert_of(loc.rest) is not None
        out.append(Param(i, t.chunk, t.key, t.gkey, tuple(t.shape), t.dtype, expert, t.gkey in shared_keys))
    return out


def n_subs(cfg, layout) -> int:
    return subs_for(bool(cfg.num_experts), layout)


def subs_for(experts: bool, layout) -> int:
    """Sub-optimizers of megatron-core's ChainedOptimizer: dense, plus expert when experts use their groups."""
    return 2 if (experts and expert_groups(layout)) else 1


def split_subs(params: list[Param], n: int) -> list[list[Param]]:
    if n == 1:
        return [params]
    return [[p for p in params if not p.expert], [p for p in params if p.expert]]


# --- the flat buffer layout (DistributedOptimizer, megatron-core 0.19.2) -----------------------

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


def _dt(name: str) -> torch.dtype:
    return getattr(torch, name)


def _entry(state: dict, dt: tuple[str, str], where: str) -> dict:
    for k, v in state.items():
        if isinstance(k, tuple) and len(k) == 2 and tuple(str(x).removeprefix("torch.") for x in k) == dt:
            return v
    raise BadInput(f"{where}: no buffer for dtypes {dt} (found {[k for k in state]})")


# --- decoding a source rank file --------------------------------------------------------------

@dataclass
class FileState:
    """Decoded optimizer state of one rank file."""

    tensors: dict[int, dict[str, torch.Tensor]]     # Param.index -> {comp: local fp32 tensor}
    common: object                                  # the `optimizer` key without per-param tensors
    step: float | None


def detect(sd: dict, model_path: Path) -> dict | None:
    """The optimizer variant of a rank file, or None when it carries no optimizer state."""
    d = Path(model_path).parent
    for bad in sorted(d.glob("layer_wise_optimizer_*.pt"))[:1]:
        raise BadInput(f"{bad}: layer-wise distributed optimizer state is not supported")
    if (d / "optim.pt").exists() or (d / "model_rng.pt").exists():
        raise BadInput(f"{d}: pre-2023 distributed optimizer layout (per-DP optim.pt) is not supported")
    if "optimizer" not in sd:
        return None
    opt = sd["optimizer"]
    first = next((o for o in opt if o is not None), None) if isinstance(opt, list) else opt
    if not isinstance(first, dict):
        raise BadInput(f"{model_path}: 'optimizer' is a {type(first).__name__}, not a state dict")
    n = len(opt) if isinstance(opt, list) else 1
    if "param_state" in first or "param_state_sharding_type" in first:
        raise BadInput(f"{model_path}: optimizer state in a torch_dist layout inside a legacy file is not supported")
    if "state" in first and "param_groups" in first:
        return _with_merge({"kind": "adam", "variant": "fp32", "subs": n}, opt, model_path)
    inner = first.get("optimizer")
    if not isinstance(inner, dict) or "param_groups" not in inner:
        raise BadInput(f"{model_path}: unrecognised 'optimizer' entry (keys {sorted(map(str, first))[:6]})")
    if "state" in inner:
        if "fp32_from_fp16_params" not in first:
            raise BadInput(f"{model_path}: mixed-precision optimizer state without fp32_from_fp16_params")
        return _with_merge({"kind": "adam", "variant": "float16", "subs": n}, opt, model_path)
    if not (d / DIST_FILE).is_file():
        raise BadInput(f"missing {d / DIST_FILE}: the optimizer key says distributed optimizer")
    return _with_merge({"kind": "distributed", "variant": "distributed", "subs": n}, opt, model_path)


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


def classify(p: Param, args: dict) -> tuple[bool, bool]:
    """(weight decay off, decoupled lr) as megatron-core's standard overrides decide them."""
    one_d = len(p.shape) == 1 or p.key.endswith(".bias")
    if args.get("apply_wd_to_qk_layernorm"):
        one_d = one_d and not ("q_layernorm." in p.key or "k_layernorm." in p.key)
    emb = args.get("decoupled_lr") is not None and p.gkey in EMBEDDING_OR_OUTPUT
    return one_d, emb


def group_of(p: Param, groups: list[dict], args: dict, where: str) -> int:
    wd0, emb = classify(p, args)
    dec = args.get("decoupled_lr")
    hits = [i for i, g in enumerate(groups)
            if (float(g.get("wd_mult", 1.0)) == 0.0) == wd0 and bool(g.get("is_expert_parallel", False)) == p.expert
            and (dec is None or (g.get("max_lr") == dec) == emb)]
    if len(hits) != 1:
        raise BadInput(f"{where}: cannot place parameter {p.key!r} in one of the {len(groups)} param groups "
                       "(only megatron-core's standard grouping is supported)")
    return hits[0]


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


def strip_adam(state: dict, variant: str) -> dict:
    """The layout-free part of a non-distributed optimizer state dict (param groups without indices)."""
    inner = state if variant == "fp32" else state["optimizer"]
    out = {"param_groups": [{k: v for k, v in g.items() if k != "params"} for g in inner["param_groups"]]}
    if variant == "float16" and "grad_scaler" in state:
        out["grad_scaler"] = state["grad_scaler"]
    return out


@dataclass
class Context:
    """What decoding and encoding a rank file's optimizer state needs (pure data)."""

    family: object
    cfg: object
    layout: object
    args: dict
    info: dict                  # {"kind", "variant", "subs", "comps"}

    def params(self, fp) -> list[Param]:
        return file_params(self.family, self.cfg, self.layout, fp)

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
    for fp in files:
        params = ctx.params(fp)
        for chunk in fp.chunks:
            order.check_sequence([p.gkey for p in params if p.chunk == chunk], f"{fp.dirname}/{chunk}")


def decode_file(ctx: Context, fp, sd: dict, model_path: Path) -> FileState:
    """Per-parameter fp32 state of one source rank file."""
    where = str(model_path)
    params = ctx.params(fp)
    subs, bufs = ctx.layout_of(fp, params)
    kind = ctx.info["kind"]
    if "optimizer" not in sd:
        raise BadInput(f"{where}: no 'optimizer' entry while other rank files have one")
    if kind == "distributed":
        from ckptctl.formats import legacy
        dpath = Path(model_path).parent / DIST_FILE
        tensors = decode_distributed(legacy.load_pt(dpath), subs, bufs, str(dpath)) if dpath.is_file() else {}
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


# --- sub-optimizer structure (ChainedOptimizer, megatron-core 0.19.2) ---------------------------
#
# `get_megatron_optimizer` builds param groups once over all params (`_get_param_groups`: key =
# (standard overrides, is_expert_parallel), unified over all ranks, sorted with the no-override group
# first), then gives the groups with is_expert_parallel=False to the dense sub-optimizer and the others
# to the expert one. Hyperparameters of a group depend only on its overrides, never on EP, so the
# expert group of an override equals the dense group of that override except for is_expert_parallel.

GROUP_ROLE = ("params", "is_expert_parallel")      # not hyperparameters: where a group sits


def canon(obj) -> str:
    """A byte-exact, order-stable text form of plain state (tensors by dtype, shape and raw bytes)."""
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


def split_sub(ctx: "Context", sub: dict, files: list) -> list[dict]:
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


def restructure(ctx: "Context", n_src: int, common, files: list | None):
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


# --- encoding a target rank file ---------------------------------------------------------------

def writer_flags(layout, fp) -> tuple[bool, bool]:
    """Whether the rank writing this directory is DP-rank 0 of the dense / expert sub-optimizer."""
    dense = expert = False
    for rank in range(layout.world):
        tp, dp, pp = layout.dense_coords(rank)
        etp, ep, edp = layout.expert_coords(rank)
        if (tp, pp, ep) == (fp.coord.tp, fp.coord.pp, fp.coord.ep) and (dp == 0 or edp == 0):
            dense |= dp == 0
            expert |= edp == 0
    return dense, expert


def encode_distributed(ctx: Context, fp, params, tensors: dict[int, dict]) -> object:
    subs, bufs = ctx.layout_of(fp, params)
    flags = writer_flags(ctx.layout, fp)
    states = []
    for s, sub_bufs in enumerate(bufs):
        if len(bufs) > 1 and not flags[s]:
            states.append(None)
            continue
        state: dict = {"buckets_coalesced": True}
        for g, buf in enumerate(sub_bufs):
            e = {c: torch.zeros(buf.numel_unpadded, dtype=torch.float32) for c in ctx.info["comps"]}
            for p, off in zip(buf.params, buf.offsets):
                for c in e:
                    e[c][off:off + p.numel] = tensors[p.index][c].reshape(-1)
            e["numel_unpadded"] = buf.numel_unpadded
            state[g] = {(_dt(buf.dtypes[0]), _dt(buf.dtypes[1])): e}
        states.append(state)
    return states[0] if len(states) == 1 else states


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


def target_comps(info: dict) -> tuple[str, ...]:
    return tuple(info["comps"])


def fill_tensors(reader, fp, params: list[Param], comps) -> dict[int, dict]:
    """Per-parameter state of a target file, read from the store through the weight's pieces."""
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


def write_target(ctx: Context, reader, fp, sd: dict, out_dir: Path, common) -> int:
    """Put the optimizer state of one target file into `sd` (and distrib_optim.pt into out_dir)."""
    from ckptctl.formats import legacy
    params = ctx.params(fp)
    comps = target_comps(ctx.info)
    tensors = fill_tensors(reader, fp, params, comps)
    if ctx.info["kind"] == "distributed":
        legacy.save_pt(encode_distributed(ctx, fp, params, tensors), Path(out_dir) / DIST_FILE)
        sd["optimizer"] = common
    else:
        sd["optimizer"] = encode_adam(ctx, fp, params, tensors, common)
    return sum(p.numel * 4 * len(comps) for p in params)


# --- planning: store arrays and which file writes which optimizer region -----------------------

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


# --- glue: inspect, the worker phases, verify ----------------------------------------------------

ARG_KEYS = ("use_distributed_optimizer", "accumulate_allreduce_grads_in_fp32", "overlap_grad_reduce",
            "overlap_param_gather_with_optimizer_step", "ddp_num_buckets", "ddp_bucket_size",
            "ddp_pad_buckets_for_high_nccl_busbw", "decoupled_lr", "apply_wd_to_qk_layernorm", "optimizer")


def comps_of(kind: str, variant: str) -> list[str]:
    return ["exp_avg", "exp_avg_sq"] if variant == "fp32" else ["param", "exp_avg", "exp_avg_sq"]


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


class SourceSide:
    """Source phase: decode each rank file's optimizer state and write the regions it owns."""

    def __init__(self, family, cfg, layout, info: dict, plan):
        self.ctx = Context(family, cfg, layout, info.get("args", {}), info)
        self.info, self.plan = info, plan
        check_order(self.ctx, plan.files)
        self.has = [state_indices(self.ctx, fp, writer_flags(layout, fp)) for fp in plan.files]
        self.owned = owned_pieces(self.ctx, plan, self.has)

    def arrays(self) -> dict[str, dict]:
        return plan_arrays(self.plan, self.info["comps"])

    def owned_bytes(self, i: int) -> int:
        fp = self.plan.files[i]
        return sum(fp.tensors[k].pieces[j].local.volume * 4 * len(self.info["comps"])
                   for k, flags in self.owned[i].items() for j, o in enumerate(flags) if o)

    def write_file(self, store, i: int, fp, sd: dict, model_path: Path, progress=None) -> FileState:
        st = decode_file(self.ctx, fp, sd, model_path)
        # the state must be its parameter's (issue 10), checked before anything of it is written
        optim_check.check_file(self.ctx.params(fp), st.tensors, lambda p: sd[p.chunk][p.key], str(model_path))
        for idx, flags in self.owned[i].items():
            if idx not in st.tensors:
                raise BadInput(f"{model_path}: no optimizer state for {fp.tensors[idx].key!r}")
            for piece, owned in zip(fp.tensors[idx].pieces, flags):
                if not owned:
                    continue
                for c in self.info["comps"]:
                    q = optim_piece(piece, c)
                    part = st.tensors[idx][c][q.local.slices]
                    store.write(q.array, q.gbox, part.contiguous())
                    if progress is not None:
                        progress.add(part.numel() * 4)
        return st


def store_attrs(info: dict) -> dict:
    return {k: info.get(k) for k in ("kind", "variant", "subs", "comps", "args", "merge", "experts")}


class TargetSide:
    """Target phase: the source's state re-encoded for the target layout, its sub-optimizer structure
    rebuilt (`restructure`). `common` None: only check that the state can be written (before any output);
    `files`: every target file plan, needed when the expert sub-optimizer is split off."""

    def __init__(self, family, cfg, layout, info: dict, common, files: list | None = None):
        tgt_subs = n_subs(cfg, layout)
        if tgt_subs < info["subs"] and info.get("merge"):
            raise BadInput(info["merge"])
        self.ctx = Context(family, cfg, layout, info.get("args", {}), {**info, "subs": tgt_subs})
        self.common = restructure(self.ctx, info["subs"], common, files)

    def write(self, reader, fp, sd: dict, out_dir: Path) -> int:
        return write_target(self.ctx, reader, fp, sd, out_dir, self.common)


def form_text(info: dict) -> str:
    """What a legacy checkpoint holds of this optimizer state."""
    return ("distributed optimizer (distrib_optim.pt flat buffers + param groups)" if info["kind"] == "distributed"
            else f"Adam state dict ({'fp32' if info['variant'] == 'fp32' else 'mixed precision, fp32 masters'})")


def policy_text(info: dict | None, src_layout, dst_layout, src_form: str | None = None,
                dst_form: str | None = None) -> str:
    """`src_form` / `dst_form`: the optimizer state's form in a torch_dist source / target (None: legacy)."""
    if info is None:
        return "absent in the source: none written"
    comps = ", ".join(info["comps"])
    what = src_form or form_text(info)
    if dst_form is not None:
        what += f", written as {dst_form}"
    elif src_form is not None:
        what += f", written as {form_text(info)}"
    dp = "" if dst_layout is None else f"; re-encoded for {dst_layout} (DP={dst_layout.dp})"
    n = info["subs"] if dst_layout is None else subs_for(bool(info.get("experts")), dst_layout)
    subs = "" if n == info["subs"] else (
        f"; sub-optimizers {info['subs']} -> {n}: " + ("the expert param groups (equal to the dense ones, step "
                                                       "included) merged into the dense ones" if n < info["subs"]
                                                       else "each param group, its step and grad scaler copied to the "
                                                       "dense and expert sub-optimizers whose params it held"))
    return (f"converted: {what}; {comps} resharded per parameter like its weight (vocab padding rows "
            f"follow the weight rows, rows the target adds are zero); step and param-group "
            f"hyperparameters copied{'' if dst_form else ', param indices rebuilt'}{dp}{subs}")


# --- verify ------------------------------------------------------------------------------------

class Gather:
    """The optimizer arrays of one checkpoint, assembled from its rank files (never the store)."""

    def __init__(self, src):
        from ckptctl.models import get_family
        self.src = src
        self.info = src.optim
        self.side = SourceSide(get_family(src.family), src.cfg, src.layout, self.info, src.plan)
        self.paths = {i["dirname"]: Path(i["path"]) for i in src.inventories}
        self._states: dict[int, FileState] = {}
        self.by_array: dict[str, list] = {}
        for fi, fp in enumerate(src.plan.files):
            for p in self.side.ctx.params(fp):
                if p.index not in self.side.has[fi]:
                    continue
                flags = self.side.owned[fi][p.index]
                for piece, owned in zip(fp.tensors[p.index].pieces, flags):
                    self.by_array.setdefault(piece.array, []).append((fi, p.index, piece, owned))

    def state(self, fi: int) -> FileState:
        if fi not in self._states:
            from ckptctl.formats import legacy
            fp = self.src.plan.files[fi]
            path = self.paths[fp.dirname]
            self._states[fi] = decode_file(self.side.ctx, fp, legacy.load_pt(path), path)
        return self._states[fi]

    def arrays(self) -> list[str]:
        return [a for a in self.src.plan.arrays if a in self.by_array]

    def gather(self, array: str, comp: str) -> tuple[torch.Tensor, list]:
        from ckptctl.verify import Difference, _diff
        spec = self.src.plan.arrays[array]
        out = torch.empty(spec["shape"], dtype=torch.float32)
        problems = []
        for fi, idx, piece, owned in sorted(self.by_array[array], key=lambda e: not e[3]):
            q = optim_piece(piece, comp)
            local = self.state(fi).tensors[idx][comp][q.local.slices].reshape(q.gbox.sizes)
            if owned:
                out[q.gbox.slices] = local
            else:
                d = _diff(out[q.gbox.slices], local)
                if d is not None:
                    problems.append(Difference(optim_array(array, comp), "replica differs", count=d[0],
                                               first_index=d[1], where=self.src.plan.files[fi].dirname))
        return out, problems

    def common(self):
        st = self.state(0)
        if self.info["kind"] == "distributed":
            subs = st.common if isinstance(st.common, list) else [st.common]
            return {"step": st.step, "subs": [None if s is None else
                                              {"param_groups": s["optimizer"]["param_groups"],
                                               "grad_scaler": s.get("grad_scaler")} for s in subs]}
        return st.common

    def groups_by_array(self) -> dict[str, str]:
        """Model array -> the hyperparameters (and step) of its param group and its sub-optimizer's grad
        scaler: what a parameter's optimizer settings are, whatever the sub-optimizer structure."""
        subs = self.common()["subs"]
        memo: dict[tuple[int, int], str] = {}
        out: dict[str, str] = {}
        ctx = self.side.ctx
        for fp in self.src.plan.files:
            for s, sub in enumerate(split_subs(ctx.params(fp), ctx.info["subs"])):
                groups = subs[s]["param_groups"]
                for p in sub:
                    gi = group_of(p, groups, ctx.args, fp.dirname)
                    if (s, gi) not in memo:
                        memo[s, gi] = canon([hyper(groups[gi]), subs[s].get("grad_scaler")])
                    for piece in fp.tensors[p.index].pieces:
                        out.setdefault(piece.array, memo[s, gi])
        return out


def gatherer(src) -> Gather:
    """The optimizer-state gather of an inspected checkpoint of either format."""
    if getattr(src, "fmt", "legacy") == "torch_dist":
        from ckptctl.formats import torch_dist_optim
        return torch_dist_optim.Gather(src)
    return Gather(src)


def verify_optimizer(sa, sb, rep) -> None:
    """Compare optimizer state of two checkpoints bitwise, tensor by tensor (DESIGN §9)."""
    from ckptctl.verify import Difference, _diff, compare_arrays
    ia, ib = getattr(sa, "optim", None), getattr(sb, "optim", None)
    if ia is None and ib is None:
        return
    if (ia is None) != (ib is None):
        rep.differences.append(Difference("optimizer", f"optimizer state only in {'a' if ia else 'b'}"))
        return
    if (ia["kind"], ia["variant"]) != (ib["kind"], ib["variant"]):
        rep.differences.append(Difference("optimizer", f"optimizer kinds differ: {ia['kind']}/{ia['variant']} vs "
                                                       f"{ib['kind']}/{ib['variant']}"))
        return
    ga, gb = gatherer(sa), gatherer(sb)
    ca, cb = ga.common(), gb.common()
    for k in ("step",):
        if repr(ca.get(k)) != repr(cb.get(k)):
            rep.differences.append(Difference("optimizer.step", f"differs: {ca.get(k)!r} vs {cb.get(k)!r}"))
    gra, grb = ga.groups_by_array(), gb.groups_by_array()
    bad = [a for a in gra if a in grb and gra[a] != grb[a]]
    if bad:
        rep.differences.append(Difference("optimizer.param_groups", f"param-group hyperparameters or grad scaler "
                                                                    f"differ for {len(bad)} parameter(s), first {bad[0]}"))
    names_b = set(gb.arrays())
    # Beside the decoding shared with convert: each side's fp32 master against its weight, the weight taken
    # by verify's own reference gather (optim_check.verify_invariant; issue 10).
    from ckptctl.verify import Gatherer as WeightGather
    weights = {"a": (sa, WeightGather(sa)), "b": (sb, WeightGather(sb))}
    for array in ga.arrays():
        if array not in names_b:
            rep.differences.append(Difference(optim_array(array, "*"), "optimizer state only in a"))
            continue
        got = {}
        for c in ia["comps"]:
            rep.tensors += 1
            ta, pa = ga.gather(array, c)
            tb, pb = gb.gather(array, c)
            rep.differences.extend(pa + pb)
            compare_arrays(optim_array(array, c), ta, tb, sa.plan.arrays[array].get("vocab", False), rep)
            if c == "param":
                for side, t in (("a", ta), ("b", tb)):
                    src, wg = weights[side]
                    if array in src.plan.arrays:
                        d = optim_check.verify_invariant(f"{side} ({src.ckpt.root})", array, t, wg.gather(array)[0])
                        if d is not None:
                            rep.differences.append(d)
            got[c] = ta
        # A moment byte-identical to the master weights or to the other moment is a known bug class.
        master = got.get("param")
        if master is None and sa.plan.arrays[array]["dtype"] == "float32":
            master = None   # fp32 Adam: the weight is the master; compared below through the model array
        for c in ADAM_KEYS:
            t = got.get(c)
            if t is None or not bool((t != 0).any()):
                continue
            others = [("param", master)] + [(o, got.get(o)) for o in ADAM_KEYS if o != c]
            for name, o in others:
                if o is not None and o.shape == t.shape and _diff(t, o) is None:
                    rep.differences.append(Difference(optim_array(array, c),
                                                      f"byte-identical to {name} (a moment copied from another buffer)"))
        del got
    for array in sorted(names_b - set(ga.arrays())):
        rep.differences.append(Difference(optim_array(array, "*"), "optimizer state only in b"))


# --- `ckptctl example --optimizer` ---------------------------------------------------------------

EXAMPLE_ARGS = {"optimizer": "adam", "lr": 3e-4, "min_lr": 3e-5, "weight_decay": 0.01, "adam_beta1": 0.9,
                "adam_beta2": 0.95, "adam_eps": 1e-8, "accumulate_allreduce_grads_in_fp32": True,
                "overlap_grad_reduce": False, "overlap_param_gather": False, "ddp_bucket_size": None,
                "decoupled_lr": None, "consumed_train_samples": 80, "consumed_valid_samples": 0}
EXAMPLE_STEP = 10


def default_kind(layout) -> str:
    """`ckptctl example` default: the distributed optimizer when there is data parallelism, else Adam."""
    return "distributed" if layout.dp > 1 else "adam"


def example_groups(family, cfg, src_plan, step: int, lr: float, with_expert: bool) -> list[list[dict]]:
    """Param groups per sub-optimizer as megatron-core 0.19.2 builds them (standard overrides), read
    back from a real torch AdamW so that every field torch adds is present."""
    kinds = []
    for fp in src_plan.files:
        for p in file_params(family, cfg, Layout1(), fp):
            wd0 = len(p.shape) == 1 or p.key.endswith(".bias")
            e = with_expert and family.expert_of(family.locate(p.gkey).rest) is not None
            if (wd0, e) not in kinds:
                kinds.append((wd0, e))
    kinds.sort(key=lambda k: k[0])   # the no-override group first, then wd_mult=0 (stable for experts)
    subs = [[k for k in kinds if not k[1]]] + ([[k for k in kinds if k[1]]] if with_expert else [])
    out = []
    for sub in subs:
        groups = []
        for wd0, e in sub:
            g = {"params": [torch.nn.Parameter(torch.zeros(1))], "is_expert_parallel": e, "default_config": True,
                 "wd_mult": 1.0, "lr_mult": 1.0, "is_decoupled_lr": False,
                 "max_lr": EXAMPLE_ARGS["lr"], "min_lr": EXAMPLE_ARGS["min_lr"]}
            if wd0:
                g["wd_mult"] = 0.0
            groups.append(g)
        opt = torch.optim.AdamW(groups, lr=EXAMPLE_ARGS["lr"], weight_decay=EXAMPLE_ARGS["weight_decay"],
                                betas=(EXAMPLE_ARGS["adam_beta1"], EXAMPLE_ARGS["adam_beta2"]), eps=EXAMPLE_ARGS["adam_eps"])
        pgs = opt.state_dict()["param_groups"]
        for g in pgs:
            g["lr"] = lr
            del g["params"]
        out.append(pgs)
    return out


def example_master(w: torch.Tensor, gen) -> torch.Tensor:
    """An fp32 master of a half-precision weight that is not the weight itself but rounds to it, as after a
    megatron-core step (weight = master rounded to nearest): noise under a fifth of the weight's ulp (|w| *
    eps < 2 ulp; a fifth of an ulp is also under half the finer ulp below a power of two)."""
    wf = w.float()
    eps = torch.finfo(w.dtype).eps
    m = wf + (torch.rand(w.shape, generator=gen) - 0.5) * 0.2 * wf.abs() * eps
    assert torch.equal(m.to(w.dtype).view(torch.int16), w.view(torch.int16)), "example master must round to the weight"
    return m


class Layout1:
    """A TP1PP1 stand-in for `file_params` on the example's global plan (no expert groups, no sharing)."""

    tp = pp = ep = expert_tp = dp = cp = edp = 1


def example_state(kind: str, family, cfg, layout, src_plan, arrays: dict, dtype: str, gen) -> tuple[dict, object, dict]:
    """Global optimizer arrays (non-zero, moments distinct from each other and from the master),
    the layout-free common state, and the optimizer variant, for `ckptctl example`."""
    variant = "distributed" if kind == "distributed" else ("fp32" if dtype == "float32" else "float16")
    info = {"kind": kind, "variant": variant, "subs": n_subs(cfg, layout),
            "comps": comps_of(kind, variant), "args": {k: v for k, v in EXAMPLE_ARGS.items() if v is not None}}
    info["args"]["use_distributed_optimizer"] = kind == "distributed"
    out = {}
    for name in plan_arrays(src_plan, info["comps"]):
        base = "model/" + name.split("/", 2)[2]
        w = arrays[base]
        comp = name.split("/")[1]
        if comp == "param":
            t = w.float() if dtype == "float32" else example_master(w, gen)
        elif comp == "exp_avg":
            t = torch.randn(w.shape, generator=gen) * 1e-3
        else:
            t = torch.rand(w.shape, generator=gen) * 1e-6 + 1e-9
        out[name] = t
    groups = example_groups(family, cfg, src_plan, EXAMPLE_STEP, 2.7e-4, info["subs"] == 2)
    scaler = {"scale": torch.tensor(65536.0), "growth_tracker": 3, "hysteresis_tracker": 2} if dtype == "float16" else None
    if kind == "distributed":
        subs = []
        for pgs in groups:
            c = {"optimizer": {"param_groups": [{**g, "step": float(EXAMPLE_STEP)} for g in pgs]}}
            if scaler is not None:
                c["grad_scaler"] = scaler
            subs.append(c)
        common = subs[0] if len(subs) == 1 else subs
    else:
        subs = [{"param_groups": pgs, **({"grad_scaler": scaler} if scaler is not None and variant == "float16" else {})}
                for pgs in groups]
        common = {"subs": subs, "step": float(EXAMPLE_STEP)}
    return out, common, info
