"""Optimizer state in megatron-core's `torch_dist` format (DESIGN §6.3), read and written: the distributed
optimizer's two reshardable forms and the non-distributed optimizer's.

megatron-core 0.19.2 `DistributedOptimizer.sharded_state_dict` saves the state in one of two ways,
chosen by `content_metadata["distrib_optim_sharding_type"]` (Megatron-LM core_v0.19.0 passes
`dp_reshardable` unless `--dist-ckpt-optim-fully-reshardable`):

* `fully_reshardable` (model space): `optimizer.state.{param,exp_avg,exp_avg_sq}.<model key>`, each
  shaped and chunked exactly like the model tensor (main replicas only); `param` is the fp32 master.
  The param groups (with `step`) sit in the common state under `optimizer.optimizer`.
* `dp_reshardable` (bucket space): per model-parallel rank `g = tp + TP*pp` (`dp_group_idx_<g>`), per
  buffer and bucket, one 1-D tensor per state component
  `optimizer.distributed.dp_group_idx_<g>.gbuf_idx_<i>.dtype_(<param dtype>, <grad dtype>).bucket_idx_<b>.<comp>`
  of the bucket's unpadded size; every DP rank saves one chunk per parameter slice it owns and one per
  alignment gap (bucket end padding is not saved). Objects `...dp_group_idx_<g>.optimizer` (param
  groups), `.grad_scaler` (when there is one), `.per_bucket_numel`, `.per_bucket_numel_unpadded`.
  Concatenating a buffer's buckets gives exactly the flat tensor of a legacy `distrib_optim.pt`, so it is
  decoded with the same layout code (`ckptctl.optim`).

Reading fills the store's per-parameter `optim/{param,exp_avg,exp_avg_sq}/<array>` (the arrays the legacy
reader fills), per source model-parallel rank, through the legacy plan of the source layout; so either
form goes to legacy `distrib_optim.pt` or to torch_dist at any other TP/PP/DP. Writing produces the
chunks and objects megatron-core saves for the target layout. Several sub-optimizers (ChainedOptimizer:
dense + expert with EP>1 or ETP!=TP): dp_reshardable keys and objects get a `chained_<i>.` prefix, the
expert one indexed by its rank in the tp-ep-pp group and sharded over the expert DP group; fully_reshardable
keeps the model keys (megatron-core adds no prefix there) and the common `optimizer` becomes {i: ...}.

The non-distributed optimizer (megatron-core 0.19.2 `FP32Optimizer` / `Float16OptimizerWithFloat16Params`
`sharded_state_dict`; no `distrib_optim_sharding_type` in the content metadata) is model space too:
`optimizer.state.{exp_avg,exp_avg_sq}.<model key>` and, mixed precision, `optimizer.state.fp32_param.<key>`
for each half-precision parameter (an fp32 parameter is its own master), every one the model tensor's
chunks and replica ids (`make_sharded_optimizer_tensor` replaces only key and data). The common state's
`optimizer` holds torch's param groups without `params` and `state: {"common_step": step}` (the shared
Adam step; absent at step 0): bare for FP32Optimizer, under `optimizer` (with `grad_scaler` when there is
one) for the mixed-precision one; with several sub-optimizers (ChainedOptimizer, no prefix since
`chained_optim_avoid_prefix`) a dict {index: that}. It fills and is filled from the store's arrays of the
legacy Adam state dict (`optim/{param,exp_avg,exp_avg_sq}`).
"""
from __future__ import annotations

import dataclasses
import re
from pathlib import Path
from types import SimpleNamespace

import torch

from ckptctl import optim, optim_check
from ckptctl.box import Box
from ckptctl.errors import BadInput

SHARDING_TYPES = ("dp_reshardable", "fully_reshardable")
DEFAULT_SHARDING = "dp_reshardable"          # Megatron-LM core_v0.19.0 without --dist-ckpt-optim-fully-reshardable
# Types megatron-core 0.19.2 knows but ckptctl does not convert: their state is dropped and reported.
OTHER_TYPES = ("dp_zero_gather_scatter", "fully_sharded_model_space", "fully_sharded_bucket_space", "fsdp_dtensor")
STATE = "optimizer.state."
DIST = "optimizer.distributed."
# Store component -> the name in `optimizer.state.<name>.<model key>`: the distributed optimizer's
# fully_reshardable form keeps the store names, the non-distributed one calls the master `fp32_param`.
DIST_NAMES = {"param": "param", "exp_avg": "exp_avg", "exp_avg_sq": "exp_avg_sq"}
ADAM_NAMES = {"param": "fp32_param", "exp_avg": "exp_avg", "exp_avg_sq": "exp_avg_sq"}
COMMON_STEP = "common_step"


def check_sharding(name: str | None) -> str:
    """The target sharding type (`--optim-sharding`); default dp_reshardable, as Megatron-LM saves."""
    name = name or DEFAULT_SHARDING
    if name not in SHARDING_TYPES:
        raise BadInput(f"--optim-sharding: expected one of {', '.join(SHARDING_TYPES)}, got {name!r}")
    return name


def group_index(layout, coord, sub: int = 0) -> int:
    """megatron-core's `data_parallel_group_idx` of sub-optimizer `sub` at a rank file: dense, the rank in
    the model-parallel (TP x PP) group; expert (sub 1), the rank in the tp-ep-pp group (ETP fastest)."""
    if sub == 0:
        return coord.tp + layout.tp * coord.pp
    return coord.etp + layout.expert_tp * (coord.ep + layout.ep * coord.pp)


def sub_dp(layout, sub: int) -> int:
    """The data-parallel size a sub-optimizer shards its buckets over (expert: expert DP)."""
    return layout.dp * layout.cp if sub == 0 else layout.edp


def chained(sub: int, n: int) -> str:
    """ChainedOptimizer's key prefix for dp_reshardable state of several sub-optimizers."""
    return f"chained_{sub}." if n > 1 else ""


def _dtype_tag(dtypes: tuple[str, str]) -> str:
    return f"dtype_(torch.{dtypes[0]}, torch.{dtypes[1]})"


def bucket_key(g: int, gbuf: int, dtypes: tuple[str, str], b: int, comp: str, pre: str = "") -> str:
    return f"{pre}{DIST}dp_group_idx_{g}.gbuf_idx_{gbuf}.{_dtype_tag(dtypes)}.bucket_idx_{b}.{comp}"


def object_key(g: int, what: str, pre: str = "") -> str:
    return f"{pre}{DIST}dp_group_idx_{g}.{what}/shard_0_1"


# --- inspect ------------------------------------------------------------------------------------

def int_keyed(opt) -> bool:
    """Several sub-optimizers' common state: {0: ..., 1: ...} (ChainedOptimizer)."""
    return isinstance(opt, dict) and bool(opt) and all(isinstance(k, int) for k in opt)


def sharding_of(common: dict) -> str | None:
    cm = common.get("content_metadata") or {}
    st = cm.get("distrib_optim_sharding_type")
    opt = common.get("optimizer")
    if int_keyed(opt):
        opt = opt[min(opt)]
    if st is None and isinstance(opt, dict):
        st = opt.get("param_state_sharding_type")
    return st


def chained_subs(names, where) -> int:
    """The number of `chained_<i>.` prefixes (dp_reshardable with several sub-optimizers; 1 without)."""
    found = {int(m.group(1)) for n in names if (m := re.match(r"chained_(\d+)\.", n))}
    if found and found != set(range(len(found))):
        raise BadInput(f"{where}: sub-optimizer prefixes chained_{sorted(found)} are not 0..{len(found) - 1}")
    return max(1, len(found))


def strip_chained(name: str) -> str:
    return re.sub(r"^chained_\d+\.", "", name)


def inspect_info(ck, cfg, layout) -> dict | None:
    """The optimizer variant of a torch_dist checkpoint (as `optim.inspect_info` gives for legacy), or
    None when there is none ckptctl converts (non-distributed or chained state: dropped and reported).
    An unknown sharding type is refused, naming it."""
    names = ck.index["order"]
    if not any(n.startswith(("optimizer", "chained_")) for n in names):
        return None
    st = sharding_of(ck.common)
    if st is None:
        return adam_info(ck, cfg, layout) if any(n.startswith(STATE) for n in ck.index["tensors"]) else None
    if st not in SHARDING_TYPES + OTHER_TYPES:
        raise BadInput(f"{ck.iter_dir}: unknown distributed-optimizer sharding type {st!r} "
                       f"(content_metadata.distrib_optim_sharding_type; known: {', '.join(SHARDING_TYPES + OTHER_TYPES)})")
    if st not in SHARDING_TYPES:
        return None
    opt = ck.common.get("optimizer")
    if st == "fully_reshardable":
        if any(n.startswith("chained_") for n in names):    # chained_optim_avoid_prefix off: older saves
            return None
        n = len(opt) if int_keyed(opt) else 1
    else:
        n = chained_subs(names, ck.iter_dir)
    d = {"kind": "distributed", "variant": "distributed", "subs": n}
    if n > 1:               # whether they could be merged into one, checked before any output is written
        try:
            optim.merge_subs(dist_commons(ck.index, ck.iter_dir, opt, st, [0] * n), "distributed", str(ck.iter_dir))
            d["merge"] = None
        except BadInput as e:
            d["merge"] = str(e)
    info = optim.inspect_info([d], [ck.iter_dir], cfg, layout, ck.args)
    prefix = STATE if st == "fully_reshardable" else DIST
    comps = set()
    for name in ck.index["tensors"]:
        name = strip_chained(name)
        if name.startswith(prefix):
            comps.add(name[len(STATE):].split(".", 1)[0] if st == "fully_reshardable" else name.rsplit(".", 1)[1])
    if comps != set(info["comps"]):
        raise BadInput(f"{ck.iter_dir}: optimizer state components {sorted(comps)}; only Adam's "
                       f"{', '.join(info['comps'])} are supported")
    return {**info, "sharding": st}


def dist_commons(index: dict, iter_dir: Path, opt, st: str, groups: list[int]) -> list[dict]:
    """Per sub-optimizer {"optimizer": {"param_groups"}, ["grad_scaler"]} (the legacy `optimizer` entry):
    from the common state's `optimizer` (fully_reshardable) or from the objects of model-parallel rank
    `groups[s]` of each sub-optimizer s (dp_reshardable)."""
    from ckptctl.formats import torch_dist
    n = len(groups)
    out = []
    for s, g in enumerate(groups):
        if st == "fully_reshardable":
            sub = opt[s] if int_keyed(opt) else opt
            out.append({k: v for k, v in (sub or {}).items() if k in ("optimizer", "grad_scaler")})
            continue
        e = {}
        for what in ("optimizer", "grad_scaler"):
            key = object_key(g, what, chained(s, n))
            ref = index["objects"].get(key)
            if ref is not None:
                e[what] = torch_dist.load_object(iter_dir, ref, key)
        out.append(e)
    for s, e in enumerate(out):
        if not isinstance(e.get("optimizer"), dict) or "param_groups" not in e["optimizer"]:
            where = "" if st == "fully_reshardable" else f" (model-parallel rank {groups[s]})"
            raise BadInput(f"{iter_dir}: no optimizer param groups for sub-optimizer {s}{where}")
    return out


def adam_subs(opt, where) -> list[dict]:
    """The common state's `optimizer` of the non-distributed optimizer, one entry per sub-optimizer."""
    if int_keyed(opt):
        if sorted(opt) != list(range(len(opt))):
            raise BadInput(f"{where}: sub-optimizer indices {sorted(opt)} in the common state's 'optimizer'")
        return [opt[k] for k in range(len(opt))]
    return [opt]


def adam_variant(sub, where) -> str:
    """'fp32' (FP32Optimizer: {state, param_groups}) or 'float16' (mixed precision: {optimizer, [grad_scaler]})."""
    if isinstance(sub, dict) and isinstance(sub.get("state"), dict) and isinstance(sub.get("param_groups"), list):
        return "fp32"
    inner = sub.get("optimizer") if isinstance(sub, dict) else None
    if isinstance(inner, dict) and isinstance(inner.get("state"), dict) and isinstance(inner.get("param_groups"), list):
        return "float16"
    keys = sorted(map(str, sub)) if isinstance(sub, dict) else type(sub).__name__
    raise BadInput(f"{where}: the common state's 'optimizer' ({keys}) is neither megatron-core's FP32Optimizer nor "
                   "its mixed-precision optimizer state (and no distrib_optim_sharding_type is recorded)")


def adam_info(ck, cfg, layout) -> dict:
    """The non-distributed optimizer's variant (as `optim.inspect_info` gives it for a legacy Adam state dict)."""
    where = str(ck.iter_dir)
    subs = adam_subs(ck.common.get("optimizer"), where)
    variants = {adam_variant(s, where) for s in subs}
    if len(variants) > 1:
        raise BadInput(f"{where}: sub-optimizers mix FP32 and mixed-precision optimizer state")
    variant = variants.pop()
    names = {n[len(STATE):].split(".", 1)[0] for n in ck.index["tensors"] if n.startswith(STATE)}
    allowed = {ADAM_NAMES[c] for c in optim.comps_of("adam", variant)}
    need = set(optim.ADAM_KEYS)
    if not need <= names <= allowed:
        raise BadInput(f"{where}: optimizer state components {sorted(names)}; only Adam's {', '.join(sorted(allowed))} "
                       f"are supported ({'mixed precision' if variant == 'float16' else 'fp32'} optimizer)")
    d = {"kind": "adam", "variant": variant, "subs": len(subs)}
    if len(subs) > 1:       # whether they could be merged into one, checked before any output is written
        try:
            optim.merge_subs([optim.strip_adam(s, variant) for s in subs], "adam", where)
            d["merge"] = None
        except BadInput as e:
            d["merge"] = str(e)
    info = optim.inspect_info([d], [ck.iter_dir], cfg, layout, ck.args)
    return {**info, "sharding": None}


def adam_common(opt, variant: str, where) -> dict:
    """The store's `{"subs", "step"}` (as legacy Adam gives it) from the common state's `optimizer`."""
    steps = set()
    subs = []
    for sub in adam_subs(opt, where):
        inner = sub if variant == "fp32" else sub["optimizer"]
        extra = set(inner["state"]) - {COMMON_STEP}
        if extra:
            raise BadInput(f"{where}: the common optimizer state holds {sorted(map(str, extra))[:4]} besides "
                           f"{COMMON_STEP!r} (per-parameter steps are not supported)")
        if COMMON_STEP in inner["state"]:
            steps.add(float(inner["state"][COMMON_STEP]))
        subs.append(optim.strip_adam(sub, variant))
    if len(steps) > 1:
        raise BadInput(f"{where}: sub-optimizers have different Adam steps {sorted(steps)}")
    return {"subs": subs, "step": steps.pop() if steps else None}


def adam_dist_common(common: dict, variant: str):
    """The common state's `optimizer` as megatron-core 0.19.2 saves the non-distributed optimizer."""
    step = common.get("step")
    out = []
    for sub in common["subs"]:
        state = {COMMON_STEP: torch.tensor(step, dtype=torch.float32)} if step else {}   # `if step:` as mcore
        inner = {"state": state, "param_groups": [dict(g) for g in sub["param_groups"]]}
        if variant == "fp32":
            out.append(inner)
            continue
        sd = {"optimizer": inner}
        if "grad_scaler" in sub:
            sd["grad_scaler"] = sub["grad_scaler"]
        out.append(sd)
    return out[0] if len(out) == 1 else dict(enumerate(out))


# --- reading ------------------------------------------------------------------------------------

def legacy_files(family, cfg, layout, plan) -> list:
    """The legacy rank-file plans of `layout` over the store arrays of `plan` (named_parameters order)."""
    from ckptctl.reshard.plan import plan_target
    return plan_target(family, cfg, layout, plan.manifest, plan.arrays, set(plan.slots))


class ModelSpace:
    """`fully_reshardable` tensors as a reader of store-array regions: read(optim/<comp>/<array>, box)."""

    def __init__(self, family, cfg, layout, dist: dict, names: dict = DIST_NAMES, own_master: bool = False):
        """`names`: store component -> state name; `own_master`: an fp32 model tensor without a master
        key is its own `param` (mixed-precision non-distributed optimizer)."""
        from ckptctl.formats import torch_dist
        index, self.iter_dir = dist["index"], Path(dist["iter_dir"])
        self.pieces: dict[str, list] = {}
        for comp in optim.ADAM_KEYS + ("param",):
            pre = f"{STATE}{names[comp]}."
            tensors = index["tensors"]
            real = {n[len(pre):]: n for n in index["order"] if n in tensors and n.startswith(pre)}
            if comp == "param" and own_master:
                real.update({n: n for n in index["order"] if n in tensors and n not in real
                             and not n.startswith(("optimizer", "chained_")) and tensors[n].get("dtype") == "float32"})
            if not real:
                continue
            sub = {"tensors": {k: index["tensors"][v] for k, v in real.items()}, "objects": {}, "order": list(real)}
            sp = torch_dist.plan_source(family, cfg, layout, sub, dist["spec"])
            for fp in sp.files:
                for t in fp.tensors:
                    item = dataclasses.replace(t, chunk=real[t.chunk])
                    for p in t.pieces:
                        self.pieces.setdefault(optim.optim_array(p.array, comp), []).append((item, p))
        self.unit = torch_dist.DistUnit(self.iter_dir, index, layout, None)

    def read(self, name: str, box: Box) -> torch.Tensor:
        out = torch.empty(box.sizes, dtype=torch.float32)
        got = 0
        for item, p in self.pieces.get(name, ()):
            hit = p.gbox.intersect(box)
            if hit is None:
                continue
            x = self.unit.tensor(item)
            src = hit.shift(tuple(lo - g for lo, g in zip(p.local.offsets, p.gbox.offsets)))
            out[hit.shift(tuple(-o for o in box.offsets)).slices] = x[src.slices]
            got += hit.volume
        if got != box.volume:
            raise BadInput(f"{self.iter_dir}: the fully_reshardable chunks of {name!r} cover {got} of the "
                           f"{box.volume} elements a rank needs")
        return out


class BucketSpace:
    """`dp_reshardable` tensors of one model-parallel rank, reassembled into the legacy flat buffers."""

    def __init__(self, dist: dict):
        self.iter_dir, self.index = Path(dist["iter_dir"]), dist["index"]

    def flat(self, key: str) -> torch.Tensor:
        from ckptctl.formats import torch_dist
        t = self.index["tensors"][key]
        (n,) = t["shape"]
        out = torch.empty(n, dtype=torch.float32)
        got = 0
        for off, sizes, *ref in t["chunks"]:
            x = torch_dist.load_tensor(self.iter_dir, ref, key)
            if tuple(x.shape) != tuple(sizes) or x.dtype != torch.float32:
                raise BadInput(f"{self.iter_dir / ref[0]}: chunk {off} of {key!r} holds {x.dtype} {tuple(x.shape)}")
            out[off[0]:off[0] + sizes[0]] = x
            got += sizes[0]
        if got != n:
            raise BadInput(f"{self.iter_dir}: the chunks of {key!r} cover {got} of its {n} elements")
        return out

    def state(self, g: int, bufs: list, comps, expected: list[list[int]], where: str, pre: str = "",
              lays: list | None = None) -> dict:
        """The `distrib_optim.pt` dict of rank g: each buffer's buckets concatenated. `lays` (per buffer,
        `optim.buffer_layout`): each parameter's range must be a span of the saved chunks."""
        state: dict = {"buckets_coalesced": True}
        for gi, (buf, sizes) in enumerate(zip(bufs, expected)):
            e = {}
            for c in comps:
                parts = []
                for b, size in enumerate(sizes):
                    key = bucket_key(g, gi, buf.dtypes, b, c, pre)
                    t = self.index["tensors"].get(key)
                    if t is None:
                        raise BadInput(f"{where}: no {key!r} (the model layout gives {len(sizes)} bucket(s) in "
                                       f"buffer {gi}; different bucket settings?)")
                    if t["shape"] != [size]:
                        raise BadInput(f"{where}: {key!r} has {t['shape']} elements, the model layout gives [{size}]")
                    if lays is not None:
                        pos, buckets = lays[gi]
                        b0 = buckets[b][0]
                        members = [(st - b0, en - b0, p) for (st, en, bi), p in zip(pos, buf.params) if bi == b]
                        optim_check.check_bucket_chunks(t["chunks"], key, members, size, where)
                    parts.append(self.flat(key))
                extra = bucket_key(g, gi, buf.dtypes, len(sizes), c, pre)
                if extra in self.index["tensors"]:
                    raise BadInput(f"{where}: {extra!r} is beyond the {len(sizes)} bucket(s) the model layout gives")
                e[c] = torch.cat(parts)
            e["numel_unpadded"] = sum(sizes)
            state[gi] = {tuple(getattr(torch, d) for d in buf.dtypes): e}
        return state


def bucket_layouts(ctx, fp, bufs: list, pp_rank: int, sub: int, total: int) -> list[tuple[list, list]]:
    """Per buffer of sub-optimizer `sub`, `optim.buffer_layout` (param ranges and buckets) under the
    context's DDP settings (`total`: the rank's parameter count, as `optim.Context.layout_of` takes it)."""
    dp = sub_dp(ctx.layout, sub)
    out = []
    for buf in bufs:
        bs = optim.bucket_size_of(ctx.args, ctx.layout, pp_rank, buf.chunk_index, total)
        out.append(optim.buffer_layout([p.numel for p in buf.params], [p.shared for p in buf.params], bs, dp,
                                       bool(ctx.args.get("ddp_pad_buckets_for_high_nccl_busbw"))))
    return out


class Decoder:
    """Per source model-parallel rank: the decoded `optim.FileState` of its parameters."""

    def __init__(self, family, cfg, layout, info: dict, plan, dist: dict):
        self.info, self.dist, self.layout = info, dist, layout
        self.files = legacy_files(family, cfg, layout, plan)
        self.ctx = optim.Context(family, cfg, layout, info.get("args", {}), info)
        self.adam = info["kind"] == "adam"
        self.model = (ModelSpace(family, cfg, layout, dist, ADAM_NAMES, info["variant"] == "float16") if self.adam else
                      ModelSpace(family, cfg, layout, dist) if info.get("sharding") == "fully_reshardable" else None)
        self.buckets = BucketSpace(dist) if self.model is None else None
        self.iter_dir = Path(dist["iter_dir"])
        # every parameter placed by the model's order (the plan follows it; `.metadata` order is never used)
        optim.check_order(self.ctx, self.files)

    def whole_common(self) -> dict:
        """The checkpoint's common state (read once)."""
        from ckptctl.formats import legacy, torch_dist
        if getattr(self, "_common", None) is None:
            ref = self.dist["index"]["objects"].get(f"{torch_dist.COMMON_KEY}/shard_0_1")
            self._common = (torch_dist.load_object(self.iter_dir, ref, torch_dist.COMMON_KEY) if ref else
                            legacy.load_pt(self.iter_dir / torch_dist.COMMON_PT, mmap=False))
        return self._common

    def common(self, fp) -> object:
        """The legacy `optimizer` key of a rank file: {"optimizer": param groups with step, ["grad_scaler"]},
        a list of them with several sub-optimizers."""
        n = self.info["subs"]
        groups = [group_index(self.layout, fp.coord, s) for s in range(n)]
        subs = dist_commons(self.dist["index"], self.iter_dir, self.whole_common().get("optimizer"),
                            self.info["sharding"], groups)
        return subs[0] if n == 1 else subs

    def decode(self, i: int) -> optim.FileState:
        fp = self.files[i]
        params = self.ctx.params(fp)
        comps = self.info["comps"]
        if self.adam:
            common = adam_common(self.whole_common().get("optimizer"), self.info["variant"], self.iter_dir)
            return optim.FileState(optim.fill_tensors(self.model, fp, params, comps), common, common["step"])
        common = self.common(fp)
        steps = {pg.get("step") for c in (common if isinstance(common, list) else [common])
                 for pg in c["optimizer"]["param_groups"]}
        step = next(iter(steps)) if len(steps) == 1 else None
        if self.model is not None:
            return optim.FileState(optim.fill_tensors(self.model, fp, params, comps), common, step)
        subs, bufs = self.ctx.layout_of(fp, params)
        total = sum(p.numel for p in params)
        states = []
        for s, sub_bufs in enumerate(bufs):
            g = group_index(self.layout, fp.coord, s)
            lays = bucket_layouts(self.ctx, fp, sub_bufs, fp.coord.pp, s, total)
            sizes = [[b[2] for b in lay[1]] for lay in lays]
            where = f"{self.iter_dir} ({chained(s, len(bufs))}dp_group_idx_{g}, {fp.dirname})"
            states.append(self.buckets.state(g, sub_bufs, comps, sizes, where, chained(s, len(bufs)), lays))
        where = f"{self.iter_dir} ({fp.dirname})"
        state = states[0] if len(states) == 1 else states
        return optim.FileState(optim.decode_distributed(state, subs, bufs, where), common, step)


class DistOptimSource:
    """Source phase: every worker decodes its share of the source model-parallel ranks and writes the
    store regions each owns (the first rank holding a region, as for legacy files)."""

    def __init__(self, family, cfg, layout, info: dict, plan, dist: dict):
        self.info, self.plan = info, plan
        self.dec = Decoder(family, cfg, layout, info, plan, dist)
        files = self.dec.files
        self.owned = optim.owned_pieces(self.dec.ctx, SimpleNamespace(files=files),
                                        [{p.index for p in self.dec.ctx.params(fp)} for fp in files])

    def arrays(self) -> dict[str, dict]:
        return optim.plan_arrays(self.plan, self.info["comps"])

    def run(self, store, comm, progress) -> dict:
        """Decode and write this worker's ranks; returns the object encodings to record (rank 0: common)."""
        from ckptctl.reshard.comm import assign
        from ckptctl.reshard.run import OPTIM_COMMON, put_object
        files = self.dec.files
        sizes = [sum(p.numel for p in self.dec.ctx.params(fp)) + 1 for fp in files]
        encodings = {}
        weights = optim_check.DistWeights(self.plan, self.dec.dist, self.dec.layout)
        for i in assign(sizes, comm.world)[comm.rank]:
            fp = files[i]
            st = self.dec.decode(i)
            # the state must be its parameter's (issue 10): the master against the weight in the chunks
            optim_check.check_file(self.dec.ctx.params(fp), st.tensors, lambda p: weights.weight(fp, p),
                                   f"{self.dec.iter_dir} ({fp.dirname})")
            for idx, flags in self.owned[i].items():
                for piece, owned in zip(fp.tensors[idx].pieces, flags):
                    if not owned:
                        continue
                    for c in self.info["comps"]:
                        q = optim.optim_piece(piece, c)
                        part = st.tensors[idx][c][q.local.slices]
                        store.write(q.array, q.gbox, part.contiguous())
                        progress.add(part.numel() * 4)
            if i == 0:
                encodings[OPTIM_COMMON] = put_object(store, OPTIM_COMMON, st.common)
        return encodings


class Gather(optim.Gather):
    """verify's gather of a torch_dist checkpoint's optimizer state (rank by rank, never the store)."""

    def __init__(self, src):
        from ckptctl.models import get_family
        self.dec = Decoder(get_family(src.family), src.cfg, src.layout, src.optim, src.plan, src.dist)
        proxy = SimpleNamespace(family=src.family, cfg=src.cfg, layout=src.layout, optim=src.optim, inventories=[],
                                plan=SimpleNamespace(files=self.dec.files, arrays=src.plan.arrays))
        super().__init__(proxy)

    def state(self, fi: int) -> optim.FileState:
        if fi not in self._states:
            self._states[fi] = self.dec.decode(fi)
        return self._states[fi]


# --- writing ------------------------------------------------------------------------------------

def form_text(info: dict, sharding: str | None) -> str:
    """What a torch_dist checkpoint holds of this optimizer state (`sharding`: the distributed optimizer's
    form; the non-distributed optimizer has none)."""
    if info["kind"] == "adam":
        names = ",".join(ADAM_NAMES[c] for c in info["comps"])
        kind = "fp32" if info["variant"] == "fp32" else "mixed precision, fp32 masters of half-precision params"
        return (f"torch_dist non-distributed Adam ({kind}): optimizer.state.{{{names}}}.<model key> chunked like "
                "the weights, common_step and param groups in the common state")
    if sharding == "fully_reshardable":
        return ("torch_dist fully_reshardable: optimizer.state.{param,exp_avg,exp_avg_sq}.<model key> chunked like "
                "the weights, param groups in the common state")
    return ("torch_dist dp_reshardable: optimizer.distributed.dp_group_idx_<g>.gbuf_idx_<i>.<dtypes>.bucket_idx_<b>"
            ".{param,exp_avg,exp_avg_sq} per model-parallel rank, bucket and DP share, with its param groups and "
            "bucket sizes")


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
            import argparse
            a = dict(vars(out["args"]))
            a["use_distributed_optimizer"] = True
            a["dist_ckpt_optim_fully_reshardable"] = self.sharding == "fully_reshardable"
            out["args"] = argparse.Namespace(**a)
        return out


def target_additions(job, store, attrs, family, cfg, dst, encs, model_chunks: list) -> Additions | None:
    """The optimizer part of a torch_dist target (None when the store has no optimizer state). The
    sub-optimizer structure is rebuilt for the target first (`optim.TargetSide`), as for legacy output."""
    from ckptctl.reshard.plan import plan_target
    from ckptctl.reshard.run import OPTIM_COMMON, get_object
    info = attrs.get("optimizer")
    if not info or OPTIM_COMMON not in encs:
        return None
    files = plan_target(family, cfg, dst, attrs["manifest"], attrs["arrays"], set(encs))
    tside = optim.TargetSide(family, cfg, dst, info, get_object(store, OPTIM_COMMON, encs[OPTIM_COMMON]), files)
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
            if c.fqn not in keys or (half_masters and comp == "param" and c.dtype not in optim.HALF):
                continue
            out.append(dataclasses.replace(c, fqn=f"{STATE}{names[comp]}.{c.fqn}", dtype="float32",
                                           parts=tuple(optim.optim_piece(p, comp) for p in c.parts)))
    return out


def _flat_chunk_class():
    from ckptctl.formats.torch_dist import DistChunk

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
            t = optim.fill_tensors(store, self.fp, [self.param], [self.comp])[self.param.index][self.comp]
            return t.reshape(-1)[self.lo:self.hi].clone()

    return FlatChunk


def bucket_space(ctx, fp, comps, ocommon) -> tuple[list, list]:
    """`dp_reshardable` chunks and objects of one target rank file, as megatron-core saves them: per
    sub-optimizer this file writes (`optim.writer_flags`: one file per model-parallel rank of each), per
    bucket and DP rank, a chunk per parameter slice and per gap, up to the bucket's unpadded end; keys
    prefixed `chained_<i>.` with several sub-optimizers."""
    params = ctx.params(fp)
    subs, bufs = ctx.layout_of(fp, params)
    n = len(bufs)
    flags = optim.writer_flags(ctx.layout, fp) if n > 1 else (True,)
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
    FlatChunk = _flat_chunk_class()
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
