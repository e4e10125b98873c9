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
  decoded with the same layout code (`ckptctl.optstate.flat`).

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

import re
from pathlib import Path

from ckptctl.errors import BadInput
from ckptctl.formats.torch_dist.metadata import load_object
from ckptctl.optstate.params import ADAM_KEYS, comps_of
from ckptctl.optstate.state import inspect_info as optim_inspect_info
from ckptctl.optstate.subopt import merge_subs, strip_adam

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
    """The optimizer variant of a torch_dist checkpoint (as `optim_inspect_info` gives for legacy), or
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
            merge_subs(dist_commons(ck.index, ck.iter_dir, opt, st, [0] * n), "distributed", str(ck.iter_dir))
            d["merge"] = None
        except BadInput as e:
            d["merge"] = str(e)
    info = optim_inspect_info([d], [ck.iter_dir], cfg, layout, ck.args)
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
                e[what] = load_object(iter_dir, ref, key)
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
    """The non-distributed optimizer's variant (as `optim_inspect_info` gives it for a legacy Adam state dict)."""
    where = str(ck.iter_dir)
    subs = adam_subs(ck.common.get("optimizer"), where)
    variants = {adam_variant(s, where) for s in subs}
    if len(variants) > 1:
        raise BadInput(f"{where}: sub-optimizers mix FP32 and mixed-precision optimizer state")
    variant = variants.pop()
    names = {n[len(STATE):].split(".", 1)[0] for n in ck.index["tensors"] if n.startswith(STATE)}
    allowed = {ADAM_NAMES[c] for c in comps_of("adam", variant)}
    need = set(ADAM_KEYS)
    if not need <= names <= allowed:
        raise BadInput(f"{where}: optimizer state components {sorted(names)}; only Adam's {', '.join(sorted(allowed))} "
                       f"are supported ({'mixed precision' if variant == 'float16' else 'fp32'} optimizer)")
    d = {"kind": "adam", "variant": variant, "subs": len(subs)}
    if len(subs) > 1:       # whether they could be merged into one, checked before any output is written
        try:
            merge_subs([strip_adam(s, variant) for s in subs], "adam", where)
            d["merge"] = None
        except BadInput as e:
            d["merge"] = str(e)
    info = optim_inspect_info([d], [ck.iter_dir], cfg, layout, ck.args)
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
        subs.append(strip_adam(sub, variant))
    if len(steps) > 1:
        raise BadInput(f"{where}: sub-optimizers have different Adam steps {sorted(steps)}")
    return {"subs": subs, "step": steps.pop() if steps else None}


def adam_dist_common(common: dict, variant: str):
    """The common state's `optimizer` as megatron-core 0.19.2 saves the non-distributed optimizer."""
    import torch   # here, not at the top: inspect's torch-free reader imports this module
    step = common.get("step")
    out = []
    for sub in common["subs"]:
        # megatron-core saves it `if step:`; a fresh state (hf --fresh-optimizer) writes its step 0 too, which
        # megatron-core's torch AdamW path needs to load it (without it: KeyError 'step')
        state = {COMMON_STEP: torch.tensor(step, dtype=torch.float32)} if step is not None else {}
        inner = {"state": state, "param_groups": [dict(g) for g in sub["param_groups"]]}
        if variant == "fp32":
            out.append(inner)
            continue
        sd = {"optimizer": inner}
        if "grad_scaler" in sub:
            sd["grad_scaler"] = sub["grad_scaler"]
        out.append(sd)
    return out[0] if len(out) == 1 else dict(enumerate(out))


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
