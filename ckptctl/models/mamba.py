"""Mamba and hybrid Mamba/attention/MLP/MoE rules (DESIGN §4.4): the one place they are written.

A hybrid model's layer `i` is the `i`-th character of its layer pattern (`hybrid_layer_pattern`, older
runs `hybrid_override_pattern`): `M` Mamba, `*` attention, `-` MLP, `E` MoE. Attention, MLP and MoE
layers reuse the GPT and MoE tables; this module adds the Mamba mixer (`decoder.layers.{i}.mixer.`):

- `in_proj.weight`: each TP rank holds `[z_r; x_r; B_r; C_r; dt_r]`; the store keeps five arrays
  `in_proj.weight.z/.x/.B/.C/.dt`, each split on dim 0 over TP (never concatenate local tensors).
- `conv1d_weight`/`conv1d_bias` (megatron-core 0.19.2 legacy names; older runs `conv1d.weight/bias`,
  both accepted, the source's emitted): `[x_r; B_r; C_r]` -> arrays `.x/.B/.C`.
- `A_log`, `dt_bias`, `D` (per head, or per channel with `D_has_hdim`), the gated `norm.weight`
  (d_inner, its groups contiguous per rank): dim 0 over TP; `out_proj.weight` dim 1 (row parallel).
- `in_proj.layer_norm_weight` (TE fused input norm) or the layer's own `norm.weight`: replicated.

Key names and order are those of megatron-core 0.19.2's HybridModel (checked on CPU with a stand-in
`mamba_ssm`, tests/mcore/mamba.py). Pipeline stages: with `|` in the pattern, segment `v*PP + p` is
chunk v of stage p; without, the layers split evenly (or by first/last-stage counts), no VPP.
"""
from __future__ import annotations

from dataclasses import dataclass

from ckptctl.errors import BadInput, LayoutError
from ckptctl.layout import Layout, stage_layers
from ckptctl.pipeline import split_of
from ckptctl.models import register
from ckptctl.models.base import EXTRA_STATE, KeyLoc, match_rule
from ckptctl.models.config import ModelConfig
from ckptctl.models.gpt import COL, GPT, OUTPUT, ROW, R, _table, check_divisible
from ckptctl.models.moe import MOE_RULES, MoE
from ckptctl.models.rules import SEGMENTS, Rule

MAMBA, ATTENTION, MLP, MOE = "M", "*", "-", "E"
LAYER_CHARS = MAMBA + ATTENTION + MLP + MOE
PIPE = "|"
# megatron-core 0.19.2 also knows these; their rules are not pinned yet (DESIGN §4.1).
UNPINNED = {"G": "gated delta net", "D": "DSA attention", "+": "MLA attention", "/": "MTP depths"}
# Megatron-LM's TransformerConfig defaults for what older args may lack.
DEFAULTS = {"mamba_state_dim": 128, "mamba_head_dim": 64, "mamba_num_groups": 8}


@dataclass(frozen=True)
class MambaDims:
    nheads: int
    headdim: int
    ngroups: int
    d_state: int

    @property
    def d_inner(self) -> int:
        return self.nheads * self.headdim

    @property
    def bc(self) -> int:
        """Rows of B (and of C): ngroups * d_state."""
        return self.ngroups * self.d_state


def dims(cfg: ModelConfig) -> MambaDims:
    e = cfg.extra
    headdim = int(e.get("mamba_head_dim") or DEFAULTS["mamba_head_dim"])
    nheads = e.get("mamba_num_heads")
    if nheads is None:  # MambaMixer: d_inner = expand * hidden (expand 2), nheads = d_inner / headdim
        if (2 * cfg.hidden) % headdim:
            raise BadInput(f"mamba d_inner = 2*hidden = {2 * cfg.hidden} is not divisible by mamba_head_dim = {headdim}")
        nheads = 2 * cfg.hidden // headdim
    return MambaDims(int(nheads), headdim, int(e.get("mamba_num_groups") or DEFAULTS["mamba_num_groups"]),
                     int(e.get("mamba_state_dim") or DEFAULTS["mamba_state_dim"]))


def in_proj_rule(cfg: ModelConfig) -> Rule:
    d = dims(cfg)
    return Rule(SEGMENTS, dim=0, segments=((".z", d.d_inner), (".x", d.d_inner), (".B", d.bc), (".C", d.bc),
                                           (".dt", d.nheads)))


def conv_rule(cfg: ModelConfig) -> Rule:
    d = dims(cfg)
    return Rule(SEGMENTS, dim=0, segments=((".x", d.d_inner), (".B", d.bc), (".C", d.bc)))


# Below `decoder.layers.<i>.`; attention, MLP and MoE layers fall through to the MoE and GPT tables.
MAMBA_RULES = _table([
    (r"norm\.(weight|bias)", R),                                   # non-fused spec: the layer's input norm
    (r"mixer\.in_proj\.layer_norm_(weight|bias)", R),             # TE fused input norm
    (r"mixer\.in_proj\.weight", in_proj_rule),
    (r"mixer\.conv1d(_|\.)(weight|bias)", conv_rule),
    (r"mixer\.(A_log|dt_bias|D)", COL),
    (r"mixer\.norm\.weight", COL),                                 # gated RMSNorm over d_inner
    (r"mixer\.out_proj\.weight", ROW),
]) + MOE_RULES

# Which layer kinds may hold a tensor (by the start of its name below the layer prefix).
_KIND_OF = (
    (("mixer.", "norm."), MAMBA),
    (("self_attention.", "input_layernorm."), ATTENTION),
    (("mlp.router.", "mlp.experts.", "mlp.shared_experts."), MOE),
    (("mlp.", "pre_mlp_layernorm."), MLP + MOE),
)


def raw_pattern(cfg: ModelConfig) -> str:
    e = cfg.extra
    p = e.get("hybrid_layer_pattern") or e.get("hybrid_override_pattern")
    if p:
        return str(p)
    if e.get("hybrid_attention_ratio") or e.get("hybrid_mlp_ratio"):
        raise BadInput("checkpoint args give hybrid_attention_ratio/hybrid_mlp_ratio but no hybrid_layer_pattern: "
                       "pass the pattern Megatron derived from them (not supported yet)")
    return MAMBA * cfg.num_layers


def parse_pattern(cfg: ModelConfig) -> list[str]:
    """The pattern's pipeline segments (one when it has no `|`); unknown or unpinned symbols are errors."""
    p = raw_pattern(cfg)
    for ch in p:
        if ch in UNPINNED:
            raise BadInput(f"hybrid layer pattern {p!r}: {ch!r} ({UNPINNED[ch]}) is not supported yet")
        if ch not in LAYER_CHARS + PIPE:
            raise BadInput(f"hybrid layer pattern {p!r}: unknown layer symbol {ch!r} (expected M, *, -, E or |)")
    segs = p.split(PIPE)
    n = sum(len(s) for s in segs)
    if n != cfg.num_layers:
        raise BadInput(f"hybrid layer pattern {p!r} has {n} layers, args say num_layers = {cfg.num_layers}")
    return segs


def layer_types(cfg: ModelConfig) -> str:
    return "".join(parse_pattern(cfg))


def target_pattern(cfg: ModelConfig, layout: Layout) -> str:
    """The pattern a run at `layout` carries: the source's when its segments fit PP*VPP (or it has no `|`
    and VPP = 1), else `|` at the even split (Megatron-LM derives VPP from the segment count)."""
    segs = parse_pattern(cfg)
    chunks = layout.pp * layout.vpp
    if (len(segs) > 1 and len(segs) == chunks) or (len(segs) == 1 and layout.vpp == 1):
        return raw_pattern(cfg)
    if not split_of(cfg, layout).even:
        raise LayoutError(f"layout {layout}: the hybrid pattern needs '|' segments, which Megatron-LM refuses "
                          "together with first/last pipeline stage layer counts")
    types = "".join(segs)
    ranges = stage_layers(len(types), layout)
    return PIPE.join(types[r.start:r.stop] for v in range(layout.vpp) for p in range(layout.pp)
                     for r in [ranges[p][v]])


@register
class Mamba(MoE):
    name = "mamba"
    mtp = False       # multi-token prediction is GPT/MoE's (ckptctl.models.deepseek)
    post_prefixes = ("decoder.final_layernorm", "decoder.final_norm", "output_layer")
    layer_rules = MAMBA_RULES

    def rule(self, loc: KeyLoc, cfg: ModelConfig) -> Rule:
        if loc.section == "layer":
            types = layer_types(cfg)
            if not 0 <= loc.layer < len(types):
                raise BadInput(f"tensor {loc.key()!r}: layer {loc.layer} beyond the pattern's {len(types)} layers")
            allowed = next((k for pre, k in _KIND_OF if loc.rest.startswith(pre)), None)
            if allowed is not None and types[loc.layer] not in allowed:
                raise BadInput(f"tensor {loc.key()!r}: layer {loc.layer} is {types[loc.layer]!r} in the hybrid "
                               f"pattern {raw_pattern(cfg)!r}, this tensor belongs to a {allowed[0]!r} layer")
            return match_rule(self.layer_rules, loc.rest, cfg, loc.key())
        return super().rule(loc, cfg)

    def layer_ranges(self, cfg: ModelConfig, layout: Layout) -> dict[str, list[list[range]]]:
        segs = target_pattern(cfg, layout).split(PIPE)
        if len(segs) == 1:
            sp = split_of(cfg, layout)
            if sp.layout is not None:
                raise LayoutError("a hybrid model places its layers with '|' in its pattern, not with "
                                  "--pipeline-model-parallel-layout")
            return {"decoder": stage_layers(cfg.num_layers, layout, sp.first, sp.last)}
        out = [[range(0)] * layout.vpp for _ in range(layout.pp)]
        start = 0
        for i, s in enumerate(segs):       # segment v*PP + p is chunk v of stage p
            v, p = divmod(i, layout.pp)
            out[p][v] = range(start, start + len(s))
            start += len(s)
        return {"decoder": out}

    def layout_args(self, args: dict, cfg: ModelConfig, layout: Layout) -> dict:
        a = dict(super().layout_args(args, cfg, layout))
        pattern = target_pattern(cfg, layout)
        for k in ("hybrid_layer_pattern", "hybrid_override_pattern"):
            if a.get(k):
                a[k] = pattern
        if not a.get("hybrid_override_pattern"):
            a["hybrid_layer_pattern"] = pattern
        # Megatron-LM derives VPP from the segments and refuses the per-stage VPP layer count with a pattern.
        a["num_layers_per_virtual_pipeline_stage"] = None
        return a

    def validate(self, cfg: ModelConfig, layout: Layout) -> None:
        types = layer_types(cfg)
        d = dims(cfg)
        tp = layout.tp
        check_divisible("mamba heads", d.nheads, tp, "TP")
        check_divisible("mamba groups", d.ngroups, tp, "TP")
        if d.nheads % d.ngroups:
            raise LayoutError(f"mamba heads = {d.nheads} is not divisible by mamba groups = {d.ngroups}")
        if MOE in types:
            MoE.validate(self, cfg, layout)        # GPT's checks, experts over EP/ETP, layer ranges
        else:
            GPT.validate(self, cfg, layout)        # heads/groups/FFN over TP, dense EP refusal, layer ranges
        target_pattern(cfg, layout)

    # --- a fresh model's keys, for `ckptctl example` (megatron-core 0.19.2 HybridModel, TE names) ---

    def mamba_keys(self, cfg: ModelConfig) -> list[tuple[str, tuple[int, ...] | None]]:
        d, H = dims(cfg), cfg.hidden
        conv = d.d_inner + 2 * d.bc
        d_conv = int(cfg.extra.get("mamba_d_conv", 4))
        return [("mixer.conv1d_weight", (conv, 1, d_conv)), ("mixer.conv1d_bias", (conv,)),
                ("mixer.dt_bias", (d.nheads,)), ("mixer.A_log", (d.nheads,)),
                ("mixer.D", (d.d_inner if cfg.extra.get("D_has_hdim") else d.nheads,)),
                ("mixer.in_proj.layer_norm_weight", (H,)),
                ("mixer.in_proj.weight", (2 * d.d_inner + 2 * d.bc + d.nheads, H)),
                (f"mixer.in_proj.{EXTRA_STATE}", None),
                ("mixer.norm.weight", (d.d_inner,)),
                ("mixer.out_proj.weight", (H, d.d_inner)), (f"mixer.out_proj.{EXTRA_STATE}", None)]

    def attention_keys(self, cfg: ModelConfig, bias: bool) -> list[tuple[str, tuple[int, ...] | None]]:
        H = cfg.hidden
        qkv = (cfg.heads + 2 * cfg.groups) * cfg.kv_channels
        return (self.linear("self_attention.linear_proj", (H, cfg.heads * cfg.kv_channels), bias, (H,))
                + [("self_attention.linear_qkv.layer_norm_weight", (H,))]
                + self.linear("self_attention.linear_qkv", (qkv, H), bias, (qkv,)))

    def mlp_layer_keys(self, cfg: ModelConfig, bias: bool) -> list[tuple[str, tuple[int, ...] | None]]:
        H, fc1 = cfg.hidden, (2 if cfg.glu else 1) * cfg.ffn
        return ([("mlp.linear_fc1.layer_norm_weight", (H,))]
                + self.linear("mlp.linear_fc1", (fc1, H), bias, (fc1,))
                + self.linear("mlp.linear_fc2", (H, cfg.ffn), bias, (H,)))

    def moe_layer_keys(self, cfg: ModelConfig, bias: bool) -> list[tuple[str, tuple[int, ...] | None]]:
        self._layers, self._next_layer = [True], 0        # MoE.mlp_keys: this layer is a MoE layer
        return [("pre_mlp_layernorm.weight", (cfg.hidden,))] + MoE.mlp_keys(self, cfg, bias)

    def global_keys(self, cfg: ModelConfig) -> list[tuple[str, tuple[int, ...] | None]]:
        bias = bool(cfg.extra.get("add_bias_linear", False))
        H, Vp = cfg.hidden, cfg.padded_vocab
        out: list[tuple[str, tuple[int, ...] | None]] = self.embedding_keys(cfg, position="none")
        per_kind = {MAMBA: lambda: self.mamba_keys(cfg), ATTENTION: lambda: self.attention_keys(cfg, bias),
                    MLP: lambda: self.mlp_layer_keys(cfg, bias), MOE: lambda: self.moe_layer_keys(cfg, bias)}
        for i, ch in enumerate(layer_types(cfg)):
            out += [(f"decoder.layers.{i}.{k}", s) for k, s in per_kind[ch]()]
        out.append(("decoder.final_norm.weight", (H,)))
        if cfg.extra.get("normalization", "RMSNorm") == "LayerNorm":
            out.append(("decoder.final_norm.bias", (H,)))
        if not cfg.tied:
            out.append((OUTPUT, (Vp, H)))
        out.append((f"output_layer.{EXTRA_STATE}", None))
        return out

    example_defaults = {"layers": 8, "bias": False, "experts": 0, "moe_ffn": None}

    def example_extra(self, opts: dict) -> dict:
        layers = int(opts.get("layers") or 8)
        pattern = opts.get("pattern") or ("M*M-" * (layers // 4 + 1))[:layers]
        n = len(pattern.replace(PIPE, ""))
        if n != layers:
            raise BadInput(f"--pattern {pattern!r} has {n} layers, --layers says {layers}: pass --layers {n}")
        extra = {"hybrid_layer_pattern": pattern, "position_embedding_type": "none", "normalization": "RMSNorm",
                 "mamba_num_heads": int(opts.get("mamba_heads") or 8), "mamba_head_dim": int(opts.get("mamba_head_dim") or 8),
                 "mamba_num_groups": int(opts.get("mamba_groups") or 8), "mamba_state_dim": int(opts.get("mamba_state") or 16),
                 "is_hybrid_model": True}
        if MOE in pattern:
            extra.update({"moe_grouped_gemm": bool(opts.get("grouped")), "moe_router_topk": 2})
        return extra


# Megatron's mamba reconfiguration pairs (TP, PP, EP, CP) (DESIGN §10). A Mamba mixer has no experts and
# CP never changes weights, so EP and CP are data-parallel-like for it: in the legacy format the pairs are
# TP/PP changes (EP/CP folded into DP). Group counts vary; TP8 needs heads and groups divisible by 8.
Mamba.matrix_pairs = [
    ("tp2pp4", "tp2pp4", {}),                                    # (2,4,1,1) -> same
    ("tp2pp2dp2", "tp4pp2", {"mamba_groups": 4}),                # (2,2,2,1) -> (4,2,1,1)
    ("tp1pp1dp4", "tp8pp1", {}),                                 # (1,1,4,1) -> (8,1,1,1), 8 groups
    ("tp1pp8", "tp1pp8", {"mamba_groups": 2}),                   # (1,8,1,1) -> same
    ("tp1pp1dp4", "tp2pp1", {"mamba_groups": 2}),                # (1,1,4,1) -> (2,1,1,1)
    ("tp8pp1", "tp1pp1dp8", {}),                                 # (8,1,1,1) -> (1,1,1,8)
    ("tp4pp1dp2", "tp2pp1dp4", {"mamba_groups": 4}),             # (4,1,1,2) -> (2,1,1,4)
    ("tp2pp1", "tp1pp2", {}),                                    # the acceptance pair
    ("tp1pp2vpp2", "tp2pp2", {"pattern": "M*|M-|M*|M-"}),        # ckptctl's own: '|' segments follow PP*VPP
]   # pairs across formats: each format's `Format.matrix_pairs` (ckptctl.matrix adds them)
