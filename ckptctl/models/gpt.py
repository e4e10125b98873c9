"""GPT sharding rules (DESIGN §4.1-4.2): the one place they are written.

BERT, T5, hybrid and MoE models reuse `LAYER_RULES` for their transformer layers.
"""
from __future__ import annotations

import re

from ckptctl.errors import LayoutError
from ckptctl.layout import Layout
from ckptctl.models import deepseek
from ckptctl.models.base import EXTRA_STATE, Family, KeyLoc, match_rule
from ckptctl.models.config import ModelConfig
from ckptctl.models.rules import REPLICATED, SEGMENTS, SPLIT, VOCAB, Rule

R = Rule(REPLICATED)
COL = Rule(SPLIT, dim=0)          # ColumnParallel: output rows split
ROW = Rule(SPLIT, dim=1)          # RowParallel: input columns split
VOCAB_ROWS = Rule(VOCAB, dim=0)
# GLU fc1: each rank holds [W_r; V_r]; the global tensor is [W; V] (two equal halves, each split).
GLU_ROWS = Rule(SEGMENTS, dim=0, segments=(("", None), ("", None)))


def fc1_rule(cfg: ModelConfig) -> Rule:
    return GLU_ROWS if cfg.glu else COL


def _table(rows):
    return [(re.compile(p), r) for p, r in rows]


# Transformer layer tensors, below `<stack>.layers.<i>.`; local-spec and TE names alike.
LAYER_RULES = _table([
    (r"(input_layernorm|pre_mlp_layernorm|pre_cross_attn_layernorm|post_attention_layernorm"
     r"|post_mlp_layernorm)\.(weight|bias)", R),
    (r"(self_attention|cross_attention)\.(q_layernorm|k_layernorm)\.(weight|bias)", R),
    (r"(self_attention|cross_attention)\.linear_(qkv|q|kv)\.layer_norm_(weight|bias)", R),
    (r"(self_attention|cross_attention)\.linear_(qkv|q|kv)\.(weight|bias)", COL),
    (r"self_attention\.core_attention\.softmax_offset", COL),
    (r"(self_attention|cross_attention)\.linear_proj\.weight", ROW),
    (r"(self_attention|cross_attention)\.linear_proj\.bias", R),
    (r"mlp\.linear_fc1\.layer_norm_(weight|bias)", R),
    (r"mlp\.linear_fc1\.(weight|bias)", fc1_rule),
    (r"mlp\.linear_fc2\.weight", ROW),
    (r"mlp\.linear_fc2\.bias", R),
]) + deepseek.MLA_RULES   # multi-latent attention (DeepSeek-V2/V3): ckptctl.models.deepseek

TOP_RULES = _table([
    (r"embedding\.word_embeddings\.weight", VOCAB_ROWS),
    (r"embedding\.(position_embeddings|tokentype_embeddings)\.weight", R),
    (r"(decoder|encoder)\.(final_layernorm|final_norm)\.(weight|bias)", R),
    (r"output_layer\.weight", VOCAB_ROWS),
])

EMBEDDING = "embedding.word_embeddings.weight"
OUTPUT = "output_layer.weight"


def check_divisible(what: str, value: int, by: int, name: str) -> None:
    if by and value % by:
        raise LayoutError(f"{what} = {value} is not divisible by {name} = {by}")


class GPT(Family):
    name = "gpt"
    post_prefixes = ("decoder.final_layernorm", "decoder.final_norm", "output_layer")
    layer_rules = LAYER_RULES
    top_rules = TOP_RULES
    stacks = ("decoder", deepseek.MTP_STACK)
    mtp = True

    def rule(self, loc: KeyLoc, cfg: ModelConfig) -> Rule:
        rest = loc.rest
        if loc.section == "layer" and loc.stack == deepseek.MTP_STACK:
            rest = deepseek.inner_rest(loc.rest)
            if rest is None:     # the MTP layer's own norms and projection
                return match_rule(deepseek.MTP_RULES, loc.rest, cfg, loc.key())
        table = self.layer_rules if loc.section == "layer" else self.top_rules
        return match_rule(table, rest, cfg, loc.key())

    def locate(self, key: str) -> KeyLoc:
        loc = super().locate(key)
        if loc.section == "layer" and loc.stack == deepseek.MTP_STACK:   # one store name for the MTP inner layer
            loc = KeyLoc(loc.section, loc.stack, loc.layer, deepseek.canonical_mtp_rest(loc.rest))
        return loc

    def stack_layers(self, cfg: ModelConfig) -> dict[str, int]:
        n = deepseek.mtp_layers(cfg) if self.mtp else 0
        return {"decoder": cfg.num_layers, **({deepseek.MTP_STACK: n} if n else {})}

    def section_rank(self, loc: KeyLoc) -> float:
        # GPTModel registers decoder (layers, final norm), then mtp, then output_layer
        if loc.section == "layer" and loc.stack == deepseek.MTP_STACK:
            return 1.7
        if self.mtp and loc.section == "post" and loc.rest.startswith("decoder."):
            return 1.5
        return super().section_rank(loc)

    def example_extra(self, opts: dict) -> dict:
        return deepseek.example_extra(opts)        # --mla, --mtp N

    def also_on(self, loc: KeyLoc, cfg: ModelConfig, layout: Layout) -> list[tuple[int, int]]:
        # the MTP chunk's own word embedding (tied to the first stage's by megatron-core)
        if loc.rest == EMBEDDING and self.mtp and deepseek.embedding_copy_on_mtp_stage(cfg, layout):
            return [(layout.pp - 1, layout.vpp - 1)]
        return []

    def tied_copies(self, cfg: ModelConfig) -> dict[str, str]:
        return {OUTPUT: EMBEDDING} if cfg.tied else {}

    def emits_copy(self, key: str, cfg: ModelConfig, layout: Layout) -> bool:
        # Tied embeddings: the last stage keeps its own copy of the embedding only when PP > 1.
        return key == OUTPUT and cfg.tied and layout.pp > 1

    def validate(self, cfg: ModelConfig, layout: Layout) -> None:
        if cfg.extra.get("mtp_num_layers") and not self.mtp:
            raise LayoutError(f"the {self.name} model has multi-token prediction (MTP) layers: not supported")
        deepseek.validate(cfg, layout)
        tp = layout.tp
        if not cfg.num_experts and (layout.ep > 1 or layout.expert_tp != tp):
            raise LayoutError(f"layout {layout} sets EP/ETP but the model has no experts: dense -> MoE conversion "
                              "is not supported")
        check_divisible("attention heads", cfg.heads, tp, "TP")
        if not deepseek.is_mla(cfg):     # MLA has no query groups nor fused QKV
            if cfg.groups % tp and tp % cfg.groups:
                raise LayoutError(f"query groups = {cfg.groups} and TP = {tp}: neither divides the other")
            check_divisible("QKV rows (heads+2*groups)*head_dim", (cfg.heads + 2 * cfg.groups) * cfg.kv_channels, tp,
                            "TP")
        check_divisible("FFN hidden size", cfg.ffn, tp, "TP")
        self.layer_ranges(cfg, layout)  # raises when layers do not split over PP*VPP

    # --- a fresh model's keys, for `ckptctl example` ---

    def layer_keys(self, cfg: ModelConfig, bias: bool) -> list[tuple[str, tuple[int, ...] | None]]:
        H, hn = cfg.hidden, cfg.kv_channels
        qkv = (cfg.heads + 2 * cfg.groups) * hn
        keys = self.norm_keys("input_layernorm", cfg)
        if deepseek.is_mla(cfg):
            keys += deepseek.mla_attention_keys(cfg, self.linear, self.norm_keys, bias)
            return keys + self.norm_keys("pre_mlp_layernorm", cfg) + self.mlp_keys(cfg, bias)
        keys += self.linear("self_attention.linear_proj", (H, cfg.heads * hn), bias, (H,))
        # megatron-core: the QKV bias exists with add_bias_linear or add_qkv_bias (Qwen2-style)
        keys += self.linear("self_attention.linear_qkv", (qkv, H), bias or bool(cfg.extra.get("add_qkv_bias")), (qkv,))
        if cfg.extra.get("qk_layernorm"):   # per-head norms (Qwen3-style), replicated over TP
            for name in ("q_layernorm", "k_layernorm"):
                keys += self.norm_keys(f"self_attention.{name}", cfg, size=hn)
        keys += self.norm_keys("pre_mlp_layernorm", cfg)
        keys += self.mlp_keys(cfg, bias)
        return keys

    def mlp_keys(self, cfg: ModelConfig, bias: bool) -> list[tuple[str, tuple[int, ...] | None]]:
        H = cfg.hidden
        fc1 = (2 if cfg.glu else 1) * cfg.ffn
        return (self.linear("mlp.linear_fc1", (fc1, H), bias, (fc1,))
                + self.linear("mlp.linear_fc2", (H, cfg.ffn), bias, (H,)))

    @staticmethod
    def norm_keys(prefix: str, cfg: ModelConfig, size: int | None = None) -> list[tuple[str, tuple[int, ...]]]:
        """A norm has a bias with LayerNorm (whatever add_bias_linear says), none with RMSNorm."""
        n = size or cfg.hidden
        keys = [(f"{prefix}.weight", (n,))]
        if cfg.extra.get("normalization", "LayerNorm") == "LayerNorm":
            keys.append((f"{prefix}.bias", (n,)))
        return keys

    @staticmethod
    def linear(prefix, wshape, bias, bshape):
        out = [(f"{prefix}.weight", wshape)]
        if bias:
            out.append((f"{prefix}.bias", bshape))
        return out + [(f"{prefix}.{EXTRA_STATE}", None)]

    @staticmethod
    def embedding_keys(cfg: ModelConfig, position: str = "learned_absolute") -> list[tuple[str, tuple[int, ...]]]:
        """Word embedding (padded vocab), then learned positions when the model has them."""
        out = [(EMBEDDING, (cfg.padded_vocab, cfg.hidden))]
        if cfg.extra.get("position_embedding_type", position) == "learned_absolute":
            out.append(("embedding.position_embeddings.weight",
                        (int(cfg.extra.get("max_position_embeddings", 64)), cfg.hidden)))
        return out

    def global_keys(self, cfg: ModelConfig) -> list[tuple[str, tuple[int, ...] | None]]:
        bias = bool(cfg.extra.get("add_bias_linear", True))
        H, Vp = cfg.hidden, cfg.padded_vocab
        out: list[tuple[str, tuple[int, ...] | None]] = self.embedding_keys(cfg)
        for i in range(cfg.num_layers):
            out += [(f"decoder.layers.{i}.{k}", s) for k, s in self.layer_keys(cfg, bias)]
        out += self.norm_keys("decoder.final_layernorm", cfg)
        for i in range(deepseek.mtp_layers(cfg) if self.mtp else 0):   # the inner layer: the last layer's spec
            out += deepseek.mtp_layer_keys(cfg, i, self.layer_keys(cfg, bias), self.linear, self.norm_keys)
        if not cfg.tied:
            out.append((OUTPUT, (Vp, H)))
        out.append((f"output_layer.{EXTRA_STATE}", None))
        return out


# Megatron's GPT reconfiguration test pairs (DESIGN §10): (source, target, example options).
GPT.matrix_pairs = [
    ("tp2pp4", "tp4pp2", {}), ("tp1pp8", "tp8pp1", {}), ("tp2pp1", "tp1pp8", {}), ("tp1pp1", "tp2pp2", {}),
    ("tp1pp1", "tp2pp4", {}), ("tp2pp4", "tp2pp4", {}),
    ("tp2pp4", "tp4pp2", {"swiglu": True}), ("tp2pp2", "tp4pp2", {"swiglu": True}),
    ("tp1pp1", "tp8pp1", {"swiglu": True}), ("tp1pp1", "tp2pp1", {"swiglu": True, "groups": 2}),
    ("tp1pp8", "tp8pp1", {"vocab": 17}), ("tp1pp8", "tp8pp1", {"vocab": 127}), ("tp1pp1", "tp1pp8", {"vocab": 31123, "hidden": 16, "heads": 4}),
    ("tp1pp4vpp2", "tp1pp2", {}), ("tp1pp4vpp2", "tp2pp1", {}), ("tp4pp1", "tp1pp2vpp1", {}),
    ("tp1pp2", "tp1pp4vpp2", {}), ("tp1pp2", "tp2pp1", {"tied": True}),
]   # pairs across formats: each format's `Format.matrix_pairs` (ckptctl.matrix adds them)
