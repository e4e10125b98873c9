"""BERT sharding rules (DESIGN §4.5): GPT's layer table under `encoder.`, plus the BERT heads.

Key names, shapes and order are those of megatron-core 0.19.2's `BertModel` built with
`bert_layer_local_spec` (`state_dict_for_save_checkpoint()`):
embedding (word, position, token types) -> `encoder.layers.{i}` -> `encoder.final_layernorm` ->
`lm_head.dense`, `lm_head.layer_norm` -> `output_layer` (weight only when untied; bias always,
vocab-parallel and padded like the embedding) -> `binary_head`, `pooler.dense` (binary head only).
"""
from __future__ import annotations

from ckptctl.models import register
from ckptctl.models.base import EXTRA_STATE
from ckptctl.models.config import ModelConfig
from ckptctl.models.gpt import GPT, OUTPUT, R, TOP_RULES, VOCAB_ROWS, _table

# BERT's top-level tensors beyond GPT's (embeddings, final norm, output weight come from TOP_RULES).
BERT_TOP_RULES = TOP_RULES + _table([
    (r"lm_head\.(dense|layer_norm)\.(weight|bias)", R),
    (r"output_layer\.bias", VOCAB_ROWS),          # (Vp,): split and padded like the embedding rows
    (r"pooler\.dense\.(weight|bias)", R),
    (r"binary_head\.(weight|bias)", R),
])


def binary_head(cfg: ModelConfig) -> bool:
    # Megatron-LM: `--bert-no-binary-head` clears `bert_binary_head` (default on).
    return bool(cfg.extra.get("bert_binary_head", True))


def tokentypes(cfg: ModelConfig) -> int:
    # pretrain_bert.py: num_tokentypes = 2 if args.bert_binary_head else 0.
    n = cfg.extra.get("num_tokentypes")
    return int(n) if n is not None else (2 if binary_head(cfg) else 0)


@register
class BERT(GPT):
    name = "bert"
    mtp = False       # multi-token prediction is GPT/MoE's (ckptctl.models.deepseek)
    stacks = ("encoder",)
    post_prefixes = ("encoder.final_layernorm", "lm_head.", "output_layer.", "binary_head.", "pooler.")
    top_rules = BERT_TOP_RULES
    # Tied embeddings (GPT.tied_copies/emits_copy): with PP > 1 the last stage holds an
    # `output_layer.weight` copy of the word embedding; with PP = 1 it is absent.

    def stack_layers(self, cfg: ModelConfig) -> dict[str, int]:
        return {"encoder": cfg.num_layers}

    example_defaults = {"tied": True}

    def example_extra(self, opts: dict) -> dict:
        head = bool(opts.get("binary_head", True))
        n = opts.get("tokentypes")
        return {"bert_binary_head": head, "num_tokentypes": int(n) if n is not None else (2 if head else 0)}

    def global_keys(self, cfg: ModelConfig) -> list[tuple[str, tuple[int, ...] | None]]:
        bias = bool(cfg.extra.get("add_bias_linear", True))
        H, Vp = cfg.hidden, cfg.padded_vocab
        out: list[tuple[str, tuple[int, ...] | None]] = self.embedding_keys(cfg)
        if tokentypes(cfg):
            out.append(("embedding.tokentype_embeddings.weight", (tokentypes(cfg), H)))
        for i in range(cfg.num_layers):
            out += [(f"encoder.layers.{i}.{k}", s) for k, s in self.layer_keys(cfg, bias)]
        out += [("encoder.final_layernorm.weight", (H,)), ("encoder.final_layernorm.bias", (H,))]
        # BertLMHead: dense and layer norm are plain torch modules (no _extra_state).
        out += [("lm_head.dense.weight", (H, H)), ("lm_head.dense.bias", (H,)),
                ("lm_head.layer_norm.weight", (H,)), ("lm_head.layer_norm.bias", (H,))]
        if not cfg.tied:
            out.append((OUTPUT, (Vp, H)))
        out += [("output_layer.bias", (Vp,)), (f"output_layer.{EXTRA_STATE}", None)]
        if binary_head(cfg):
            out += [("binary_head.weight", (2, H)), ("binary_head.bias", (2,)),
                    ("pooler.dense.weight", (H, H)), ("pooler.dense.bias", (H,))]
        return out


# Megatron's BERT reconfiguration pairs (DESIGN §10, (TP, PP)), its vocab sizes, and the acceptance
# case tp1pp2 -> tp2pp1 with tied embeddings (the tied copy on the last stage disappears at PP=1).
BERT.matrix_pairs = [
    ("tp2pp4", "tp4pp2", {}), ("tp1pp8", "tp8pp1", {}), ("tp2pp1", "tp1pp8", {}), ("tp1pp1", "tp2pp2", {}),
    ("tp1pp1", "tp2pp4", {}), ("tp1pp8", "tp2pp1", {}),
    ("tp1pp8", "tp8pp1", {"vocab": 17}), ("tp1pp8", "tp8pp1", {"vocab": 127}),
    ("tp1pp1", "tp1pp8", {"vocab": 31123, "hidden": 16, "heads": 4}), ("tp1pp1", "tp1pp8", {"vocab": 17}),
    ("tp1pp2", "tp2pp1", {"tied": False, "binary_head": False}),
]
