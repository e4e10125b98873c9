"""torch_dist key names (pure): DCP keys <-> the store's per-layer legacy names. Layer tensors are stacked
(`decoder.layers.<rest>` has a leading global-layer axis); objects carry their grid in the name
(`<key>/shard_<offsets>_<shape>`); local (non-TE) specs rename their norms to the fused TE names."""
from __future__ import annotations

import re

from ckptctl.errors import BadInput
from ckptctl.layout import FileCoord, Layout
from ckptctl.models.base import EXTRA_STATE, Family
from ckptctl.models.config import ModelConfig
from ckptctl.reshard.plan import _strip_expert

# Optimizer state (`optimizer.state...`, `optimizer.distributed...`, `chained_<i>.`) is not part of the
# weight plan: `optim_read` and `optim_write` convert it (forms it does not know are dropped and reported); the
# per-rank state of an in-flight rerun is dropped and reported.
DROPPED_PREFIXES = ("optimizer", "chained_", "rerun_state_machine_state")
# Local (non-TE) specs rename their norms to the fused TE names in sharded state dicts (mcore's
# `sharded_state_dict_keys_map`); the legacy files keep the local names.
LOCAL_ALIASES = (("input_layernorm.", "self_attention.linear_qkv.layer_norm_"),
                 ("pre_mlp_layernorm.", "mlp.linear_fc1.layer_norm_"))

# Names megatron-core keeps in sharded state dicts for every spec: Mamba's conv1d parameters under
# their pre-0.19 module names (the legacy files of 0.19.2 say `conv1d_weight`).
DIST_NAMES = (("mixer.conv1d_", "mixer.conv1d."),)
# Routed experts: SequentialMLP and TEGroupedMLP save the same keys, `mlp.experts.experts.linear_fc1.weight`
# (mcore keeps the two interchangeable), experts on an axis after the layer axis; one `_extra_state`
# object per (layer, expert).
_DIST_EXPERT = re.compile(r"^mlp\.experts\.experts\.(?P<lin>linear_fc[12])\.(?P<p>weight|bias|_extra_state)$")
_EXPERT_ARRAY = re.compile(r"^mlp\.experts\.(?P<rest>linear_fc[12]\.(weight|bias|_extra_state))$")
_STACKED = re.compile(r"^(?P<stack>[a-z_]+)\.layers\.(?P<rest>[^\d].*)$")
_SHARD = re.compile(r"^(?P<key>.+)/shard_(?P<offs>[\d.]*)_(?P<shape>[\d.]*)$")


def spec_of(args: dict) -> str:
    """Which names the legacy files of this run use: "local" or "te" (Megatron-LM's --transformer-impl)."""
    return "local" if args.get("transformer_impl") == "local" else "te"


# An MTP layer's inner transformer layer: `mtp_model_layer.` in 0.19.2's legacy files (the store's name),
# `transformer_layer.` in sharded state dicts (megatron-core maps it for older checkpoints).
MTP_INNER = (("mtp_model_layer.", "transformer_layer."),)


def to_store_rest(rest: str, spec: str) -> str:
    """A DCP layer-key rest -> the name legacy files of `spec` use (the store keeps those)."""
    for legacy_name, dist_name in MTP_INNER:
        if rest.startswith(dist_name):
            return legacy_name + to_store_rest(rest[len(dist_name):], spec)
    for legacy_name, dist_name in DIST_NAMES:
        if rest.startswith(dist_name):
            return legacy_name + rest[len(dist_name):]
    if spec == "local":
        for local, te in LOCAL_ALIASES:
            if rest.startswith(te):
                return local + rest[len(te):]
    return rest


def to_dist_rest(rest: str) -> str:
    for local, te in LOCAL_ALIASES:
        if rest.startswith(local):
            return te + rest[len(local):]
    return rest


def dist_rest(rest: str, local: bool) -> str:
    """A legacy layer-key rest (expert-free) -> megatron-core's sharded name (`local`: a local-spec model,
    whose norms all take the fused TE names, those of MoE layers included)."""
    for legacy_name, dist_name in MTP_INNER + tuple((d, d) for _, d in MTP_INNER):
        if rest.startswith(legacy_name):
            return dist_name + dist_rest(rest[len(legacy_name):], local)
    for legacy_name, dist_name in DIST_NAMES:
        if rest.startswith(legacy_name):
            return dist_name + rest[len(legacy_name):]
    m = _EXPERT_ARRAY.match(rest)
    if m:
        return "mlp.experts.experts." + m["rest"]
    return to_dist_rest(rest) if local else rest


def is_local_spec(gkeys) -> bool:
    """Whether legacy keys come from a local (non-TE) spec: its attention has a separate input norm. A TE
    spec fuses it into `linear_qkv` and keeps MoE layers' `pre_mlp_layernorm` under its own name."""
    return any(re.search(r"\.layers\.\d+\.input_layernorm\.", k) for k in gkeys)


def expert_keys(gkey: str, cfg: ModelConfig) -> list[str] | None:
    """The legacy global keys of experts 0..E-1 behind a DCP expert key at one layer, or None.

    The legacy kind follows `args.moe_grouped_gemm`: SequentialMLP `local_experts.<g>.linear_fc1.weight`,
    TEGroupedMLP `linear_fc1.weight<g>` (and its single `linear_fc1._extra_state`)."""
    m = re.match(r"^(?P<pre>[a-z_]+\.layers\.\d+\.(?:mtp_model_layer\.)?)(?P<rest>.+)$", gkey)
    e = _DIST_EXPERT.match(m["rest"]) if m else None
    if e is None:
        return None
    lin, p, n = e["lin"], e["p"], cfg.num_experts
    if cfg.extra.get("moe_grouped_gemm"):
        return [m["pre"] + (f"mlp.experts.{lin}.{p}" + ("" if p == EXTRA_STATE else str(g))) for g in range(n)]
    return [m["pre"] + f"mlp.experts.local_experts.{g}.{lin}.{p}" for g in range(n)]


def segment_of(family: Family, cfg: ModelConfig, gkey: str) -> tuple[str, str]:
    """(legacy key, array suffix) of a DCP key naming one segment of a segmented tensor (Mamba's
    `in_proj.weight.z`, mcore's ShardedTensorFactory split); (gkey, "") for any other key."""
    from ckptctl.errors import UnknownKey
    from ckptctl.models.rules import SEGMENTS
    base, dot, name = gkey.rpartition(".")
    if not dot or not base.count("."):
        return gkey, ""
    try:
        loc = family.locate(base)
        rule = family.rule(_strip_expert(family, loc), cfg)
    except (UnknownKey, BadInput):
        return gkey, ""
    if rule.kind == SEGMENTS and "." + name in {sfx for sfx, _ in rule.segments}:
        return base, "." + name
    return gkey, ""


def split_fqn(fqn: str) -> tuple[str | None, str]:
    """(stack, rest) of a layer-stacked DCP key, or (None, fqn)."""
    m = _STACKED.match(fqn)
    return (m["stack"], m["rest"]) if m else (None, fqn)


def store_key(fqn: str, layer: int | None, spec: str) -> str:
    """The store's global key of a DCP key (at `layer` when stacked); numbered keys only get aliases."""
    stack, rest = split_fqn(fqn)
    if stack is not None:
        return f"{stack}.layers.{layer}.{to_store_rest(rest, spec)}"
    m = re.match(r"^([a-z_]+\.layers\.\d+\.)(.+)$", fqn)
    if m:
        return m.group(1) + to_store_rest(m.group(2), spec)
    return fqn


def parse_shard(name: str) -> tuple[str, tuple[int, ...], tuple[int, ...]]:
    m = _SHARD.match(name)
    if not m:
        raise BadInput(f"DCP object {name!r}: expected '<key>/shard_<offsets>_<shape>'")
    ints = lambda s: tuple(int(x) for x in s.split(".")) if s else ()  # noqa: E731
    return m["key"], ints(m["offs"]), ints(m["shape"])


def rng_slot(name: str, layout: Layout) -> str:
    """`rng_state/shard_<pp>.<tp>_<PP>.<TP>` -> the store slot of the legacy directory of that rank."""
    _, offs, _ = parse_shard(name)
    pp, tp = (offs + (0, 0))[:2]
    return "rng@" + FileCoord(tp=tp, pp=pp).dirname(layout)

