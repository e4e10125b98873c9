"""MoE sharding rules (DESIGN §4.3): router, routed experts over EP x ETP, shared experts.

A MoE model is a GPT model whose MLP (on every layer, or per `moe_layer_freq`) is a router, E routed
experts and optionally a shared expert. The dense tensors use GPT's tables; this module adds the
expert names. Experts appear in rank files in one of two key layouts:

- SequentialMLP:  `mlp.experts.local_experts.{j}.linear_fc{1,2}.{weight,bias,_extra_state}`
- TEGroupedMLP:   `mlp.experts.linear_fc{1,2}.{weight,bias}{j}` plus one `mlp.experts.linear_fc{1,2}._extra_state`

`j` is the local expert index on the file's EP rank `e`; the global index is `g = e*E/EP + j`. Both
layouts map to the same canonical store arrays `mlp.experts.linear_fc{1,2}.{weight,bias}` with the experts
stacked on a leading axis of size E, so a checkpoint written with one layout can be re-emitted with the
other (`convert --expert-kind`).
"""
from __future__ import annotations

import re

from ckptctl.errors import BadInput, LayoutError
from ckptctl.layout import Layout
from ckptctl.models import register
from ckptctl.models.base import EXTRA_STATE, KeyLoc
from ckptctl.models.config import ModelConfig
from ckptctl.models.gpt import GLU_ROWS, GPT, LAYER_RULES, ROW, R, _table, check_divisible, fc1_rule
from ckptctl.models.rules import SEGMENTS, SPLIT, Rule

SEQUENTIAL = "sequential"
GROUPED = "grouped"

# Routed expert fc1 is column-parallel and fc2 row-parallel over the *expert* tensor-parallel group.
EXPERT_COL = Rule(SPLIT, dim=0, group="etp")
EXPERT_ROW = Rule(SPLIT, dim=1, group="etp")
EXPERT_GLU = Rule(SEGMENTS, dim=0, group="etp", segments=GLU_ROWS.segments)


def expert_fc1_rule(cfg: ModelConfig) -> Rule:
    return EXPERT_GLU if cfg.glu else EXPERT_COL


# Below `<stack>.layers.<i>.`; expert names here are the canonical (expert-free) store names.
MOE_RULES = _table([
    (r"mlp\.router\.(weight|bias|expert_bias|qb_beta)", R),
    (r"mlp\.experts\.linear_fc1\.(weight|bias)", expert_fc1_rule),
    (r"mlp\.experts\.linear_fc2\.weight", EXPERT_ROW),
    (r"mlp\.experts\.linear_fc2\.bias", R),
    (r"mlp\.shared_experts\.linear_fc1\.(weight|bias)", fc1_rule),
    (r"mlp\.shared_experts\.linear_fc2\.weight", ROW),
    (r"mlp\.shared_experts\.linear_fc2\.bias", R),
    (r"mlp\.shared_experts\.gate_weight", R),
]) + LAYER_RULES

# `_IN`: an MTP layer's inner transformer layer (`mtp.layers.<i>.mtp_model_layer.mlp.experts...`)
_IN = r"(?:(?:mtp_model_layer|transformer_layer)\.)?"
_SEQ = re.compile(rf"^(?P<pre>{_IN}mlp\.experts\.)local_experts\.(?P<j>\d+)\.(?P<post>linear_fc[12]\.(weight|bias|_extra_state))$")
_GRP = re.compile(rf"^(?P<pre>{_IN}mlp\.experts\.linear_fc[12]\.(weight|bias))(?P<j>\d+)$")
_GRP_EXTRA = re.compile(rf"^{_IN}mlp\.experts\.linear_fc[12]\._extra_state$")
_REFUSED = re.compile(rf"^{_IN}mlp\.experts\.(weight[12]|linear_fc[12]\.(weight|bias))$")


def expert_kind_of(keys) -> str | None:
    """`sequential`, `grouped` or None (no routed experts) from a list of keys."""
    kinds = set()
    for k in keys:
        if ".mlp.experts.local_experts." in k:
            kinds.add(SEQUENTIAL)
        elif re.search(r"\.mlp\.experts\.linear_fc[12]\.(weight|bias)\d+$", k):
            kinds.add(GROUPED)
    if len(kinds) > 1:
        raise BadInput("checkpoint mixes SequentialMLP and TEGroupedMLP expert keys")
    return kinds.pop() if kinds else None


def moe_layers(cfg: ModelConfig) -> list[bool]:
    """Which layers have a MoE MLP (`moe_layer_freq`: an int k -> every k-th layer from 0, or a 0/1 list)."""
    freq = cfg.extra.get("moe_layer_freq", 1)
    if isinstance(freq, str):  # Megatron-LM parses it into an int or list; accept a literal string too
        import ast
        try:
            freq = ast.literal_eval(freq.strip())
        except (ValueError, SyntaxError):
            raise BadInput(f"moe_layer_freq {freq!r}: expected an int or a list of 0/1") from None
    if isinstance(freq, int):
        return [i % freq == 0 for i in range(cfg.num_layers)]
    freq = list(freq)
    if len(freq) != cfg.num_layers:
        raise BadInput(f"moe_layer_freq has {len(freq)} entries for {cfg.num_layers} layers")
    return [bool(x) for x in freq]


@register
class MoE(GPT):
    name = "moe"
    layer_rules = MOE_RULES

    # --- expert keys ---

    def expert_of(self, rest: str) -> tuple[str, int] | None:
        m = _SEQ.match(rest)
        if m:
            return f"{m['pre']}local_experts.{{e}}.{m['post']}", int(m["j"])
        m = _GRP.match(rest)
        if m:
            return f"{m['pre']}{{e}}", int(m["j"])
        return None

    def expert_array(self, pattern: str) -> str:
        if ".local_experts.{e}." in pattern:
            return pattern.replace("local_experts.{e}.", "")
        if pattern.endswith("{e}"):
            return pattern[:-3]
        raise BadInput(f"not an expert key pattern: {pattern!r}")

    def locate(self, key: str) -> KeyLoc:
        loc = super().locate(key)
        if loc.section == "layer" and _REFUSED.match(loc.rest):
            raise BadInput(f"tensor {key!r}: legacy GroupedMLP (weight1/weight2) and TE single grouped expert "
                           "weights are not supported; save with SequentialMLP or TEGroupedMLP experts")
        return loc

    def object_shard(self, loc: KeyLoc, layout: Layout, fc) -> str | None:
        # TEGroupedMLP keeps one _extra_state per linear for all its local experts: its shard is the
        # (EP, ETP) rank pair, so it is carried only when both grids are unchanged.
        if loc.section == "layer" and _GRP_EXTRA.match(loc.rest):
            return f"{layout.ep}x{layout.expert_tp}|{fc.ep}x{fc.etp}"
        return None

    # --- validation (DESIGN §2) ---

    def validate(self, cfg: ModelConfig, layout: Layout) -> None:
        E = cfg.num_experts
        if not E:
            raise LayoutError("the model has no experts (num_experts is unset): not a MoE model")
        super().validate(cfg, layout)
        check_divisible("number of experts", E, layout.ep, "EP")
        etp = layout.expert_tp
        check_divisible("expert FFN hidden size", self.moe_ffn(cfg), etp, "ETP")
        if etp > 1 and cfg.extra.get("add_bias_linear", True):
            raise LayoutError(f"ETP = {etp} with linear biases: megatron-core 0.19.2 supports MoE biases only at "
                              "ETP = 1")
        shared = cfg.extra.get("moe_shared_expert_intermediate_size")
        if shared:
            check_divisible("shared expert FFN hidden size", int(shared), layout.tp, "TP")
        for k in ("moe_mlp_glu_interleave_size", "moe_shared_expert_glu_interleave_size"):
            if cfg.extra.get(k):
                raise LayoutError(f"{k} is set: interleaved GLU expert weights are not supported")
        layout.model_files  # raises when the layout is not representable in the legacy format

    @staticmethod
    def moe_ffn(cfg: ModelConfig) -> int:
        return int(cfg.moe_ffn or cfg.ffn)

    # --- a fresh model's keys, for `ckptctl example` ---

    def mlp_keys(self, cfg: ModelConfig, bias: bool) -> list[tuple[str, tuple[int, ...] | None]]:
        # GPT.global_keys asks once per layer, in order: `_layers` says which layers are MoE.
        layer = self._next_layer
        self._next_layer += 1
        if not self._layers[min(layer, len(self._layers) - 1)]:   # past the decoder: an MTP layer, as the last
            return super().mlp_keys(cfg, bias)
        H, E, Fe = cfg.hidden, cfg.num_experts, self.moe_ffn(cfg)
        fc1 = (2 if cfg.glu else 1) * Fe
        out: list[tuple[str, tuple[int, ...] | None]] = [("mlp.router.weight", (E, H))]
        if bias:
            out.append(("mlp.router.bias", (E,)))
        if cfg.extra.get("moe_router_enable_expert_bias"):
            out.append(("mlp.router.expert_bias", (E,)))
        if cfg.extra.get("moe_grouped_gemm"):
            # TE GroupedLinear: weight0..weightN, then bias0..biasN, then one _extra_state.
            for lin, w, b in (("linear_fc1", (fc1, H), (fc1,)), ("linear_fc2", (H, Fe), (H,))):
                out += [(f"mlp.experts.{lin}.weight{g}", w) for g in range(E)]
                if bias:
                    out += [(f"mlp.experts.{lin}.bias{g}", b) for g in range(E)]
                out.append((f"mlp.experts.{lin}.{EXTRA_STATE}", None))
        else:
            for g in range(E):
                p = f"mlp.experts.local_experts.{g}"
                out += self.linear(f"{p}.linear_fc1", (fc1, H), bias, (fc1,))
                out += self.linear(f"{p}.linear_fc2", (H, Fe), bias, (H,))
        shared = cfg.extra.get("moe_shared_expert_intermediate_size")
        if shared:  # megatron-core refuses biases on shared experts
            Fs = int(shared)
            if cfg.extra.get("moe_shared_expert_gate"):
                out.append(("mlp.shared_experts.gate_weight", (1, H)))
            out += self.linear("mlp.shared_experts.linear_fc1", ((2 if cfg.glu else 1) * Fs, H), False, None)
            out += self.linear("mlp.shared_experts.linear_fc2", (H, Fs), False, None)
        return out

    def global_keys(self, cfg: ModelConfig) -> list[tuple[str, tuple[int, ...] | None]]:
        self._layers, self._next_layer = moe_layers(cfg), 0
        return super().global_keys(cfg)


# Megatron's MoE reconfiguration tuples (TP, PP, EP, ETP) that legacy files can hold (DESIGN §10; the
# ETP > TP ones are refused, see tests), alternating the two expert key layouts.
_G = {"grouped": True}
_DS = {"mla": True, "mtp": 1, "dense_layers": 2, "expert_bias": True, "shared_ffn": 32, "swiglu": True, "norm": "RMSNorm"}
MoE.matrix_pairs = [
    ("tp2pp4", "tp2pp4", {}),                                   # (2,4,1,2) -> same
    ("tp1pp1", "tp1pp1ep4", _G),                                # (1,1,1,1) -> (1,1,4,1)
    ("tp1pp1ep8", "tp1pp1ep2", {}),                             # (1,1,8,1) -> (1,1,2,1)
    ("tp2pp2ep2", "tp4pp2", _G),                                # (2,2,2,2) -> (4,2,1,4)
    ("tp1pp1ep4", "tp8pp1ep1etp1", {}),                         # (1,1,4,1) -> (8,1,1,1): EP change, ETP != TP
    ("tp1pp8", "tp1pp8", _G),                                   # (1,8,1,1) -> same
    ("tp1pp1ep4", "tp2pp1", _G),                                # (1,1,4,1) -> (2,1,1,2)
    ("tp1pp1ep4", "tp2pp1ep2etp2", {"shared_ffn": 32}),         # ckptctl's own: EP and ETP both change
    ("tp1pp1", "tp1pp1ep4", {"swiglu": True}),                  # GLU (1,1,1,1) -> (1,1,4,1)
    ("tp1pp1", "tp2pp1", {"swiglu": True, **_G}),               # GLU (1,1,1,1) -> (2,1,1,1)
    ("tp1pp1ep4", "tp8pp1", {"swiglu": True}),                  # GLU (1,1,4,1) -> (8,1,1,8)
    # ckptctl's own: the expert sub-optimizer split off / merged back (optimizer state carried)
    ("tp1pp1dp2", "tp1pp1ep2dp4", {}),                          # DistOpt 1 -> 2 sub-optimizers, EDP 2
    ("tp2pp1ep4etp1", "tp2pp1", {}),                            # DistOpt 2 -> 1: EP 4 -> 1 and ETP 1 -> TP
    ("tp1pp1ep2", "tp1pp1", {"optimizer": "adam"}),             # plain Adam 2 -> 1
    # DeepSeek-V3-class (ckptctl.models.deepseek): MLA, an MTP layer, first-k dense, shared experts, expert bias
    ("tp1pp1", "tp2pp2ep2", _DS), ("tp2pp2ep2", "tp1pp4vpp2ep4", _DS),
]   # pairs across formats: each format's `Format.matrix_pairs` (ckptctl.matrix adds them)
MoE.example_defaults = {"experts": 8, "moe_ffn": 64, "bias": False}


def _example_extra(self, opts: dict) -> dict:
    extra = {**GPT.example_extra(self, opts), "moe_grouped_gemm": bool(opts.get("grouped")), "moe_router_topk": 2}
    if opts.get("shared_ffn"):
        extra["moe_shared_expert_intermediate_size"] = int(opts["shared_ffn"])
        if opts.get("shared_gate"):
            extra["moe_shared_expert_gate"] = True
    if opts.get("moe_layer_freq") is not None:
        extra["moe_layer_freq"] = opts["moe_layer_freq"]
    if opts.get("dense_layers"):     # DeepSeek-V3's first-k dense layers (--moe-layer-freq [0]*k+[1]*(L-k))
        k, n = int(opts["dense_layers"]), int(opts.get("layers") or 0)
        extra["moe_layer_freq"] = [0] * k + [1] * (n - k)
    if opts.get("expert_bias"):
        extra.update(moe_router_enable_expert_bias=True, moe_router_score_function="sigmoid")
    return extra


MoE.example_extra = _example_extra
