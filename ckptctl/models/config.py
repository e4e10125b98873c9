"""The model configuration, read from a checkpoint's Megatron `args` (argparse.Namespace)."""
from __future__ import annotations

import math
from dataclasses import dataclass, field

from ckptctl.errors import BadInput


def padded_vocab(true_vocab: int, divisor: int, tp: int) -> int:
    """Megatron's padding: the vocab rounds up to a multiple of divisor*TP (DESIGN §4.1)."""
    m = divisor * tp
    return int(math.ceil(true_vocab / m) * m)


def jsonable(v):
    """A JSON-able stand-in for an args value (dtypes and enums become strings)."""
    if v is None or isinstance(v, (bool, int, float, str)):
        return v
    if isinstance(v, (list, tuple)):
        return [jsonable(x) for x in v]
    if isinstance(v, dict):
        return {str(k): jsonable(x) for k, x in v.items()}
    return str(v)


@dataclass(frozen=True)
class ModelConfig:
    family: str
    num_layers: int
    hidden: int
    heads: int
    groups: int
    kv_channels: int
    ffn: int
    glu: bool
    tied: bool
    padded_vocab: int | None
    true_vocab: int | None
    vocab_divisor: int
    num_experts: int = 0
    moe_ffn: int | None = None
    first_stage_layers: int | None = None
    last_stage_layers: int | None = None
    extra: dict = field(default_factory=dict, compare=False)  # family-specific (mamba sizes, pattern ...)

    def to_json(self) -> dict:
        d = {k: getattr(self, k) for k in self.__dataclass_fields__ if k != "extra"}
        d["extra"] = jsonable(self.extra)
        return d

    @classmethod
    def from_json(cls, d: dict) -> "ModelConfig":
        return cls(**d)

    def vocab_for_tp(self, tp: int) -> int:
        """Padded vocab at a given TP, from the true vocab; without it, only the source's is known."""
        if self.true_vocab is None:
            raise BadInput("the true vocabulary size is unknown (not in args): pass --true-vocab-size N")
        return padded_vocab(self.true_vocab, self.vocab_divisor, tp)


def config_from_args(args: dict, family: str, true_vocab: int | None = None) -> ModelConfig:
    """Build the config from args (a dict of the Namespace's fields). Missing essentials are errors."""

    def need(name):
        v = args.get(name)
        if v is None:
            raise BadInput(f"checkpoint args lack {name!r}: cannot size the model")
        return v

    hidden = int(need("hidden_size"))
    heads = int(need("num_attention_heads"))
    groups = args.get("num_query_groups") if args.get("group_query_attention") else None
    groups = int(groups or heads)
    kv = int(args.get("kv_channels") or hidden // heads)
    ffn = int(args.get("ffn_hidden_size") or 4 * hidden)
    tv = true_vocab if true_vocab is not None else args.get("vocab_size")
    glu = bool(args.get("swiglu") or args.get("gated_linear_unit"))
    from ckptctl.pipeline import PipelineSplit
    split = PipelineSplit.from_args(args)
    extra = {k: args[k] for k in (
        "hybrid_override_pattern", "hybrid_layer_pattern", "hybrid_attention_ratio", "hybrid_mlp_ratio",
        "is_hybrid_model", "normalization", "mamba_num_heads", "mamba_head_dim", "mamba_state_dim",
        "mamba_num_groups", "num_tokentypes", "bert_binary_head", "encoder_num_layers",
        "decoder_num_layers", "moe_grouped_gemm", "moe_shared_expert_intermediate_size",
        "moe_layer_freq", "add_bias_linear", "position_embedding_type", "max_position_embeddings",
        "qk_layernorm", "moe_router_enable_expert_bias", "multi_latent_attention", "mtp_num_layers",
        "add_qkv_bias", "moe_shared_expert_gate",
        # DeepSeek-V3-class layers (ckptctl.models.deepseek): MLA sizes, which spec built them, MTP
        "q_lora_rank", "kv_lora_rank", "qk_head_dim", "qk_pos_emb_head_dim", "v_head_dim", "transformer_impl",
        "mla_down_proj_fusion", "mtp_use_repeated_layer",
        # what an exact Hugging Face mapping depends on (ckptctl.formats.hf.arch)
        "swiglu", "rotary_base", "rotary_percent", "rotary_interleaved", "use_rope_scaling", "rope_scaling_factor",
        "rotary_seq_len_interpolation_factor", "norm_epsilon", "apply_residual_connection_post_layernorm",
        "window_size", "softmax_type", "use_mup", "experimental_attention_variant", "moe_router_topk",
        "moe_router_score_function", "moe_router_pre_softmax", "moe_router_topk_scaling_factor",
        "moe_router_num_groups", "moe_router_group_topk", "moe_mlp_glu_interleave_size",
        "moe_shared_expert_glu_interleave_size", "moe_input_jitter_eps", "moe_shared_expert_overlap",
        "init_method_std", "seq_length")
        if args.get(k) is not None}
    if split.layout:
        extra["pipeline_model_parallel_layout"] = split.layout
    return ModelConfig(
        family=family,
        num_layers=int(need("num_layers")),
        hidden=hidden, heads=heads, groups=groups, kv_channels=kv, ffn=ffn, glu=glu,
        tied=not bool(args.get("untie_embeddings_and_output_weights", False)),
        padded_vocab=args.get("padded_vocab_size"),
        true_vocab=int(tv) if tv is not None else None,
        vocab_divisor=int(args.get("make_vocab_size_divisible_by") or 128),
        num_experts=int(args.get("num_experts") or 0),
        moe_ffn=args.get("moe_ffn_hidden_size"),
        first_stage_layers=split.first,
        last_stage_layers=split.last,
        extra=extra,
    )
