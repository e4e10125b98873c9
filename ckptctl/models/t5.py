"""T5 sharding rules (DESIGN §4.5): GPT's layer table for two stacks, plus the shared LM head.

Key names, shapes and order are those of megatron-core 0.19.2's `T5Model` built with the local block
specs (`state_dict_for_save_checkpoint()`):
- `encoder.layers.{i}` and `decoder.layers.{i}` are numbered separately; decoder layers add
  `pre_cross_attn_layernorm` and `cross_attention.linear_{q,kv,proj}` (GPT's LAYER_RULES cover them:
  `linear_kv` rows are `[k_h; v_h]` per head, so a plain dim-0 split keeps heads whole);
- the LM head is registered twice (`lm_head.output_layer` and `output_layer`) and learned positions
  twice (`embedding.position_embeddings` and `position_embeddings`): both names are written and the
  second is stored as a byte copy of the first;
- `lm_head.output_layer.weight` exists only untied, its `.bias` (vocab-parallel, padded) only tied;
- relative positions: `{encoder,decoder}_relative_pos_emb.relative_attention_bias.weight`
  `(buckets, heads)`, replicated;
- `{encoder,decoder}.final_layernorm` only exist when TransformerEngine is importable (the local block
  spec asks for `TENorm`); the rules accept them.
megatron-core 0.19.2 (and Megatron-LM's pretrain_t5.py) build T5 with pipeline parallelism 1 only.
"""
from __future__ import annotations

from ckptctl.errors import BadInput, LayoutError
from ckptctl.layout import Layout
from ckptctl.models import register
from ckptctl.models.base import EXTRA_STATE
from ckptctl.models.config import ModelConfig
from ckptctl.models.gpt import EMBEDDING, GPT, R, TOP_RULES, VOCAB_ROWS, _table

HEAD = "lm_head.output_layer"
POSITIONS = "embedding.position_embeddings.weight"
ALIASES = ("output_layer.weight", "output_layer.bias", "position_embeddings.weight")

T5_TOP_RULES = TOP_RULES + _table([
    (r"position_embeddings\.weight", R),
    (r"(encoder|decoder)_relative_pos_emb\.relative_attention_bias\.weight", R),
    (r"(lm_head\.)?output_layer\.(weight|bias)", VOCAB_ROWS),
])


def encoder_layers(cfg: ModelConfig) -> int:
    # Megatron-LM: `--encoder-num-layers` (defaults to --num-layers); the decoder has `num_layers`.
    return int(cfg.extra.get("encoder_num_layers") or cfg.num_layers)


def positions(cfg: ModelConfig) -> str:
    return cfg.extra.get("position_embedding_type", "learned_absolute")


@register
class T5(GPT):
    name = "t5"
    mtp = False       # multi-token prediction is GPT/MoE's (ckptctl.models.deepseek)
    stacks = ("encoder", "decoder")
    post_prefixes = ("encoder.final_layernorm", "decoder.final_layernorm", "lm_head.", "output_layer.")
    top_rules = T5_TOP_RULES

    def stack_layers(self, cfg: ModelConfig) -> dict[str, int]:
        return {"encoder": encoder_layers(cfg), "decoder": cfg.num_layers}

    def tied_copies(self, cfg: ModelConfig) -> dict[str, str]:
        """Aliased modules: the second name is a byte copy of the first (DESIGN §4.5)."""
        out = {"output_layer.bias": f"{HEAD}.bias"} if cfg.tied else {"output_layer.weight": f"{HEAD}.weight"}
        if positions(cfg) == "learned_absolute":
            out["position_embeddings.weight"] = POSITIONS
        return out

    def emits_copy(self, key: str, cfg: ModelConfig, layout: Layout) -> bool:
        return key in self.tied_copies(cfg)

    def optimizer_state(self, rest: str) -> bool:
        # An alias is the same Parameter under a second name: named_parameters() lists it once.
        return rest not in ALIASES and super().optimizer_state(rest)

    def validate(self, cfg: ModelConfig, layout: Layout) -> None:
        if layout.pp > 1 or layout.vpp > 1:
            raise LayoutError(f"layout {layout}: T5 supports pipeline parallelism 1 only (megatron-core 0.19.2 "
                              "builds T5 without pipeline stages; the encoder/decoder pipeline split was removed)")
        super().validate(cfg, layout)

    example_defaults = {"layers": 4}

    def example_extra(self, opts: dict) -> dict:
        pos = opts.get("position") or "learned_absolute"
        if pos not in ("learned_absolute", "relative", "rope"):
            raise BadInput(f"T5 position embedding {pos!r}: expected learned_absolute, relative or rope")
        out = {"encoder_num_layers": int(opts.get("encoder_layers") or opts["layers"]), "position_embedding_type": pos}
        if pos == "relative":
            out.update(relative_attention_num_buckets=32, relative_attention_max_distance=128)
        return out

    def decoder_layer_keys(self, cfg: ModelConfig, bias: bool) -> list[tuple[str, tuple[int, ...] | None]]:
        """GPT's layer keys with the cross-attention block after self-attention (module order)."""
        H, hn = cfg.hidden, cfg.kv_channels
        inner = cfg.heads * hn
        cross = self.norm_keys("pre_cross_attn_layernorm", cfg)
        cross += self.linear("cross_attention.linear_proj", (H, inner), bias, (H,))
        cross += self.linear("cross_attention.linear_q", (inner, H), bias, (inner,))
        cross += self.linear("cross_attention.linear_kv", (2 * inner, H), bias, (2 * inner,))
        keys = self.layer_keys(cfg, bias)
        at = next(i for i, (k, _) in enumerate(keys) if k == f"self_attention.linear_qkv.{EXTRA_STATE}") + 1
        return keys[:at] + cross + keys[at:]

    def global_keys(self, cfg: ModelConfig) -> list[tuple[str, tuple[int, ...] | None]]:
        bias = bool(cfg.extra.get("add_bias_linear", True))
        H, Vp = cfg.hidden, cfg.padded_vocab
        out: list[tuple[str, tuple[int, ...] | None]] = [(EMBEDDING, (Vp, H))]
        if positions(cfg) == "learned_absolute":
            seq = (int(cfg.extra.get("max_position_embeddings", 64)), H)
            out += [(POSITIONS, seq), ("position_embeddings.weight", seq)]
        elif positions(cfg) == "relative":
            buckets = int(cfg.extra.get("relative_attention_num_buckets", 32))
            out += [(f"{s}_relative_pos_emb.relative_attention_bias.weight", (buckets, cfg.heads))
                    for s in ("encoder", "decoder")]
        for i in range(encoder_layers(cfg)):
            out += [(f"encoder.layers.{i}.{k}", s) for k, s in self.layer_keys(cfg, bias)]
        for i in range(cfg.num_layers):
            out += [(f"decoder.layers.{i}.{k}", s) for k, s in self.decoder_layer_keys(cfg, bias)]
        for prefix in (HEAD, "output_layer"):
            out.append((f"{prefix}.bias", (Vp,)) if cfg.tied else (f"{prefix}.weight", (Vp, H)))
            out.append((f"{prefix}.{EXTRA_STATE}", None))
        return out


# Megatron's T5 test keeps (1,1)->(1,1) (its PP pairs went with the encoder/decoder split); the TP
# changes below are ours, including the acceptance case tp2pp1 -> tp1pp1.
T5.matrix_pairs = [
    ("tp1pp1", "tp1pp1", {}), ("tp2pp1", "tp1pp1", {}), ("tp1pp1", "tp4pp1", {"tied": True}),
    ("tp2pp1", "tp4pp1", {"position": "relative", "vocab": 250}),
]
