"""Which Hugging Face architecture a Megatron model is, and the two config translations.

A Megatron model maps to a Hugging Face class only when the HF class computes exactly what
megatron-core computes with those weights; anything else is refused (exit 2) naming the feature,
never exported approximately. The checks read Megatron-LM's `args` (the checkpoint's own, through
the store) with Megatron-LM's defaults for fields older checkpoints lack.
"""
from __future__ import annotations

from dataclasses import dataclass

from ckptctl.errors import BadInput
from ckptctl.models.config import ModelConfig

# HF model_type -> (architecture class, whether it is a MoE model)
ARCHS = {
    "llama": ("LlamaForCausalLM", False),
    "mistral": ("MistralForCausalLM", False),
    "qwen2": ("Qwen2ForCausalLM", False),
    "mixtral": ("MixtralForCausalLM", True),
    "qwen2_moe": ("Qwen2MoeForCausalLM", True),
    "qwen3": ("Qwen3ForCausalLM", False),
    "qwen3_moe": ("Qwen3MoeForCausalLM", True),
}
QK_NORM = ("qwen3", "qwen3_moe")      # per-head RMSNorm on q and k before RoPE = megatron-core's qk_layernorm
# families whose HF counterparts compute something else (or that have none ckptctl maps exactly)
REFUSED_FAMILIES = {
    "bert": "BERT (bidirectional encoder with token types, pooler and LM-head bias)",
    "t5": "T5 (encoder-decoder with cross attention)",
    "mamba": "Mamba / hybrid layers (no Hugging Face class with megatron-core's mixer layout)",
}
# Megatron-LM defaults (arguments.py, core_v0.19.0) for args an older checkpoint may lack
DEFAULTS = {"position_embedding_type": "learned_absolute", "normalization": "LayerNorm", "add_bias_linear": True,
            "add_qkv_bias": False, "rotary_base": 10000, "rotary_percent": 1.0, "norm_epsilon": 1e-5,
            "rotary_interleaved": False, "moe_router_topk": 2, "moe_router_pre_softmax": False,
            "moe_router_score_function": "softmax", "moe_layer_freq": 1}


@dataclass(frozen=True)
class Arch:
    """What the name map and config.json need: the HF model_type and the bias/expert features."""
    model_type: str
    qkv_bias: bool        # q/k/v_proj biases
    o_bias: bool          # o_proj bias (Llama attention_bias puts biases on all four)
    mlp_bias: bool        # gate/up/down biases (Llama mlp_bias)
    moe: bool
    shared: bool          # Qwen2-MoE shared expert (+ its sigmoid gate)
    qk_norm: bool = False

    @property
    def cls(self) -> str:
        return ARCHS[self.model_type][0]


def arg(args: dict, name: str):
    v = args.get(name)
    return DEFAULTS.get(name) if v is None else v


def refuse(feature: str, arch: str | None = None) -> BadInput:
    to = f" as {arch}" if arch else " to Hugging Face"
    return BadInput(f"cannot export{to} exactly: {feature}")


def choose(family: str, cfg: ModelConfig, args: dict, want: str | None = None) -> Arch:
    """The HF architecture of a Megatron model (`want`: a model_type the user asked for), or a refusal.
    `args`: the checkpoint's args; the config's extra (the same fields, kept in every store) fills gaps."""
    args = {**cfg.extra, **{k: v for k, v in args.items() if v is not None}}
    if family in REFUSED_FAMILIES:
        raise refuse(REFUSED_FAMILIES[family])
    if want is not None and want not in ARCHS:
        raise BadInput(f"--hf-arch: expected one of {', '.join(ARCHS)}, got {want!r}")
    checks = [
        (args.get("multi_latent_attention"), "multi-latent attention (MLA)"),
        (arg(args, "position_embedding_type") == "learned_absolute", "learned absolute position embeddings "
         "(Llama-family models use RoPE)"),
        (arg(args, "position_embedding_type") not in ("rope", "learned_absolute"),
         f"position embedding {arg(args, 'position_embedding_type')!r} (only RoPE maps)"),
        (arg(args, "normalization") != "RMSNorm", f"{arg(args, 'normalization')} normalization (the HF classes "
         "use RMSNorm without bias)"),
        (not cfg.glu, "a non-gated MLP (the HF classes need SwiGLU: --swiglu)"),
        (cfg.glu and not args.get("swiglu"), "a gated MLP whose activation is not SiLU (only --swiglu maps)"),
        (float(arg(args, "rotary_percent")) != 1.0, f"partial rotary embeddings (rotary_percent "
         f"{arg(args, 'rotary_percent')})"),
        (arg(args, "rotary_interleaved"), "interleaved rotary embeddings"),
        (args.get("use_rope_scaling") and args.get("rotary_seq_len_interpolation_factor"), "Llama-3 RoPE scaling "
         "together with sequence-length interpolation (HF has one rope_type)"),
        (args.get("apply_residual_connection_post_layernorm"), "residual connection after the layernorm"),
        (args.get("mtp_num_layers"), "multi-token-prediction (MTP) layers"),
        (args.get("window_size"), "sliding-window attention"),
        (args.get("softmax_type") not in (None, "vanilla"), f"softmax type {args.get('softmax_type')!r}"),
        (args.get("use_mup") or args.get("apply_query_key_layer_scaling"), "scaled attention logits"),
        (args.get("experimental_attention_variant"), "an experimental attention variant"),
    ]
    for bad, feature in checks:
        if bad:
            raise refuse(feature, want)
    linear_bias = bool(arg(args, "add_bias_linear"))
    qkv_bias = linear_bias or bool(arg(args, "add_qkv_bias"))   # megatron-core: bias = add_bias_linear or add_qkv_bias
    qk = bool(args.get("qk_layernorm"))
    if want is not None and qk != (want in QK_NORM):
        raise refuse("QK layernorm (per-head q/k norms): only qwen3 and qwen3_moe have them" if qk
                     else f"{want} has per-head q/k norms, the model has none", want)
    if qk and (linear_bias or qkv_bias):
        raise refuse("linear biases with QK layernorm (Qwen3's MLP has none)", want or "qwen3")
    if not cfg.num_experts:
        model_type = want or ("qwen3" if qk else "qwen2" if qkv_bias and not linear_bias else "llama")
        if ARCHS[model_type][1]:
            raise refuse("a dense model has no experts", model_type)
        if model_type == "qwen2" and (linear_bias or not qkv_bias):
            raise refuse("Qwen2 has biases on q/k/v_proj only" + (" (the model has linear biases)" if linear_bias
                                                                    else " (the model has none)"), model_type)
        if model_type == "mistral" and qkv_bias:
            raise refuse("linear biases (Mistral has none)", model_type)
        if model_type == "llama" and qkv_bias and not linear_bias:
            raise refuse("biases on QKV only (Llama's attention_bias covers o_proj too): use qwen2", model_type)
        return Arch(model_type, qkv_bias, linear_bias, linear_bias, False, False, qk)
    return _choose_moe(cfg, args, want, qkv_bias, linear_bias, qk)


def _choose_moe(cfg, args, want, qkv_bias, linear_bias, qk) -> Arch:
    shared = bool(cfg.extra.get("moe_shared_expert_intermediate_size") or args.get("moe_shared_expert_intermediate_size"))
    model_type = want or ("qwen3_moe" if qk else "qwen2_moe" if shared or qkv_bias else "mixtral")
    if not ARCHS[model_type][1]:
        raise refuse("a MoE model needs a MoE class (mixtral or qwen2_moe)", model_type)
    from ckptctl.models.moe import moe_layers
    checks = [
        (linear_bias, "linear biases on a MoE model (router and experts have none in HF)"),
        (arg(args, "moe_router_score_function") != "softmax", f"router score function "
         f"{arg(args, 'moe_router_score_function')!r} (HF routers use softmax)"),
        (args.get("moe_router_enable_expert_bias"), "router expert bias (aux-loss-free balancing)"),
        (args.get("moe_router_topk_scaling_factor") not in (None, 1, 1.0), "a router top-k scaling factor"),
        (args.get("moe_router_num_groups") or args.get("moe_router_group_topk"), "group-limited routing"),
        (args.get("moe_mlp_glu_interleave_size") or args.get("moe_shared_expert_glu_interleave_size"),
         "interleaved GLU experts"),
        (args.get("moe_input_jitter_eps"), "router input jitter"),
    ]
    pre = bool(arg(args, "moe_router_pre_softmax"))
    if model_type == "mixtral":
        checks += [(shared, "shared experts (Mixtral has none): use qwen2_moe"),
                   (qkv_bias, "QKV biases (Mixtral has none)"),
                   (not all(moe_layers(cfg)), "dense layers between MoE layers (moe_layer_freq)"),
                   (pre and int(arg(args, "moe_router_topk")) > 1, "softmax before top-k without renormalisation "
                    "(--moe-router-pre-softmax; Mixtral renormalises the top-k weights)")]
    elif model_type == "qwen3_moe":
        checks += [(shared, "shared experts (Qwen3-MoE has none)")]
    else:
        checks += [(not shared, "no shared expert (Qwen2-MoE always has one)"),
                   (shared and not args.get("moe_shared_expert_gate"), "an ungated shared expert (Qwen2-MoE gates "
                    "it with a sigmoid: --moe-shared-expert-gate)"),
                   (shared and args.get("moe_shared_expert_overlap"), "shared expert overlap")]
    for bad, feature in checks:
        if bad:
            raise refuse(feature, model_type)
    return Arch(model_type, qkv_bias, False, False, True, model_type == "qwen2_moe", qk)


# --- RoPE scaling ----------------------------------------------------------------------------------
# megatron-core 0.19.2 RotaryEmbedding._apply_scaling (`--use-rope-scaling`, `--rope-scaling-factor`) is
# transformers' "llama3" rope with these three values fixed; Megatron-LM passes only the factor.
LLAMA3_FIXED = {"low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
DEFAULT_THETA = {"mixtral": 1e6}     # transformers' default_theta where config.json has no rope_theta (others 1e4)


def rope_parameters(args: dict) -> dict:
    """HF `rope_parameters` of a Megatron model (rope_theta included): "llama3" for `--use-rope-scaling`,
    "linear" for `--rotary-seq-len-interpolation-factor` (megatron-core divides the positions by it, HF the
    inverse frequencies: the same angles), else "default"."""
    theta = float(arg(args, "rotary_base"))
    if args.get("use_rope_scaling"):
        return {"rope_type": "llama3", "rope_theta": theta, "factor": float(args.get("rope_scaling_factor") or 8.0),
                **LLAMA3_FIXED}
    if args.get("rotary_seq_len_interpolation_factor"):
        return {"rope_type": "linear", "rope_theta": theta, "factor": float(args["rotary_seq_len_interpolation_factor"])}
    return {"rope_type": "default", "rope_theta": theta}


def rope_args(c: dict, path: str) -> dict:
    """Megatron-LM args of an HF config's RoPE, read as transformers 5 reads it (`rope_scaling` if set, else
    `rope_parameters`; rope_theta, partial_rotary_factor and original_max_position_embeddings from the top
    level where the dict lacks them); a scaling Megatron cannot compute exactly is refused naming it."""
    params = dict(c.get("rope_scaling") or c.get("rope_parameters") or {})
    if any(isinstance(v, dict) for v in params.values()):
        raise BadInput(f"{path}: RoPE parameters per layer type have no Megatron equivalent ckptctl maps")
    kind = params.get("rope_type", params.get("type")) or "default"
    theta = float(params.get("rope_theta", c.get("rope_theta", DEFAULT_THETA.get(c.get("model_type"), 10000.0))))
    out = {"rotary_base": theta}
    partial = params.get("partial_rotary_factor", c.get("partial_rotary_factor"))
    if partial is not None and float(partial) != 1.0:
        raise BadInput(f"{path}: partial rotary embeddings (partial_rotary_factor {partial}) have no exact Megatron "
                       "mapping in ckptctl")
    if kind == "default":
        return out
    if kind == "llama3":
        got = {"factor": params.get("factor"), "low_freq_factor": params.get("low_freq_factor"),
               "high_freq_factor": params.get("high_freq_factor"),
               "original_max_position_embeddings": c.get("original_max_position_embeddings") or params.get(
                   "original_max_position_embeddings", c.get("max_position_embeddings"))}
        if None in got.values():
            raise BadInput(f"{path}: RoPE scaling llama3 lacks {[k for k, v in got.items() if v is None][0]!r}")
        off = [f"{k} {got[k]}" for k, v in LLAMA3_FIXED.items() if float(got[k]) != v]
        if off:
            raise BadInput(f"{path}: RoPE scaling llama3 with {', '.join(off)}: Megatron-LM's --use-rope-scaling "
                           "hard-codes low_freq_factor 1, high_freq_factor 4, original_max_position_embeddings 8192")
        return {**out, "use_rope_scaling": True, "rope_scaling_factor": float(got["factor"])}
    if kind == "linear":
        f = float(params.get("factor") or 0)
        if f < 1 or f != int(f):
            raise BadInput(f"{path}: RoPE scaling linear with factor {params.get('factor')}: Megatron-LM's "
                           "--rotary-seq-len-interpolation-factor takes an integer")
        return {**out, "rotary_seq_len_interpolation_factor": int(f)}
    raise BadInput(f"{path}: RoPE scaling {kind!r} has no exact Megatron equivalent (mapped: llama3 = "
                   "--use-rope-scaling, linear = --rotary-seq-len-interpolation-factor)")


# --- config.json ---------------------------------------------------------------------------------

def hf_config(arch: Arch, cfg: ModelConfig, args: dict, vocab: int, dtype: str, opts: dict | None = None) -> dict:
    """config.json of the HF model (keys as transformers 5 writes them, plus rope_theta for older readers)."""
    opts = opts or {}
    args = {**cfg.extra, **{k: v for k, v in args.items() if v is not None}}   # the store's args, the config's gaps
    theta = float(arg(args, "rotary_base"))
    c = {
        "architectures": [arch.cls], "model_type": arch.model_type,
        "vocab_size": vocab, "hidden_size": cfg.hidden, "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.heads, "num_key_value_heads": cfg.groups, "head_dim": cfg.kv_channels,
        "intermediate_size": cfg.ffn, "hidden_act": "silu",
        "max_position_embeddings": int(args.get("max_position_embeddings") or args.get("seq_length") or 4096),
        "rms_norm_eps": float(arg(args, "norm_epsilon")), "tie_word_embeddings": cfg.tied,
        "rope_parameters": rope_parameters(args), "rope_theta": theta,
        "attention_dropout": 0.0, "initializer_range": float(args.get("init_method_std") or 0.02),
        "use_cache": True, "dtype": dtype, "torch_dtype": dtype,
        "bos_token_id": opts.get("bos_token_id"), "eos_token_id": opts.get("eos_token_id"),
    }
    if c["rope_parameters"]["rope_type"] != "default":   # what transformers 4 reads
        c["rope_scaling"] = {k: v for k, v in c["rope_parameters"].items() if k != "rope_theta"}
    if arch.model_type == "llama":
        c.update(attention_bias=arch.o_bias, mlp_bias=arch.mlp_bias, pretraining_tp=1)
    elif arch.model_type == "mistral":
        c.update(sliding_window=None)
    elif arch.model_type in ("qwen2", "qwen3"):
        c.update(use_sliding_window=False, sliding_window=None, max_window_layers=cfg.num_layers)
        if arch.model_type == "qwen3":
            c.update(attention_bias=False)
    elif arch.model_type == "mixtral":
        c.update(intermediate_size=int(cfg.moe_ffn or cfg.ffn), num_local_experts=cfg.num_experts,
                 num_experts_per_tok=int(arg(args, "moe_router_topk")), sliding_window=None,
                 router_jitter_noise=0.0, output_router_logits=False,
                 router_aux_loss_coef=float(args.get("moe_aux_loss_coeff") or 0.0))
    elif arch.model_type in ("qwen2_moe", "qwen3_moe"):
        from ckptctl.models.moe import moe_layers
        if arch.shared:
            c.update(shared_expert_intermediate_size=int(args.get("moe_shared_expert_intermediate_size")
                                                         or cfg.extra["moe_shared_expert_intermediate_size"]))
        else:
            c.update(attention_bias=False)
        c.update(num_experts=cfg.num_experts, num_experts_per_tok=int(arg(args, "moe_router_topk")),
                 moe_intermediate_size=int(cfg.moe_ffn or cfg.ffn),
                 decoder_sparse_step=1, mlp_only_layers=[i for i, m in enumerate(moe_layers(cfg)) if not m],
                 norm_topk_prob=not bool(arg(args, "moe_router_pre_softmax")), qkv_bias=arch.qkv_bias,
                 use_sliding_window=False, sliding_window=None, max_window_layers=cfg.num_layers,
                 output_router_logits=False, router_aux_loss_coef=float(args.get("moe_aux_loss_coeff") or 0.0))
    return c


def generation_config(c: dict) -> dict | None:
    """generation_config.json: causal LMs only, with the token ids config.json carries (transformers
    derives the same file from the model config when saving)."""
    out = {"_from_model_config": True}
    for k in ("bos_token_id", "eos_token_id"):
        if c.get(k) is not None:
            out[k] = c[k]
    return out


def from_hf_config(c: dict, path: str) -> tuple[str, Arch, ModelConfig, dict]:
    """(family, arch, ModelConfig at TP1, Megatron-LM args fields) of an HF config.json; a model this
    mapping cannot reproduce exactly is refused naming the feature."""
    mt = c.get("model_type")
    if mt not in ARCHS:
        raise BadInput(f"{path}: Hugging Face model_type {mt!r} is not supported (supported: {', '.join(ARCHS)})")

    def need(k):
        if c.get(k) is None:
            raise BadInput(f"{path}: config.json lacks {k!r}")
        return c[k]

    rope = rope_args(c, path)
    if c.get("hidden_act", "silu") != "silu":
        raise BadInput(f"{path}: hidden_act {c['hidden_act']!r} (only silu = Megatron's --swiglu maps)")
    if c.get("sliding_window") and (mt != "qwen2" or c.get("use_sliding_window")) and mt not in ("qwen2_moe",):
        raise BadInput(f"{path}: sliding-window attention has no Megatron equivalent ckptctl maps")
    if c.get("use_sliding_window"):
        raise BadInput(f"{path}: sliding-window attention has no Megatron equivalent ckptctl maps")
    H, heads = int(need("hidden_size")), int(need("num_attention_heads"))
    groups = int(c.get("num_key_value_heads") or heads)
    hn = int(c.get("head_dim") or H // heads)
    moe = ARCHS[mt][1]
    qkv_bias = {"qwen2": True, "qwen2_moe": bool(c.get("qkv_bias", True))}.get(mt, bool(c.get("attention_bias")))
    linear_bias = mt == "llama" and bool(c.get("attention_bias"))
    qk = mt in QK_NORM
    if qk and c.get("attention_bias"):
        raise BadInput(f"{path}: {mt} with attention_bias: Megatron's biases would cover the MLP too")
    if mt == "llama" and bool(c.get("attention_bias")) != bool(c.get("mlp_bias")):
        raise BadInput(f"{path}: attention_bias {c.get('attention_bias')} with mlp_bias {c.get('mlp_bias')}: "
                       "Megatron's add_bias_linear sets both")
    arch = Arch(mt, qkv_bias, linear_bias, linear_bias, moe, mt == "qwen2_moe", qk)
    extra = {"normalization": "RMSNorm", "position_embedding_type": "rope", "add_bias_linear": linear_bias, "swiglu": True,
             "add_qkv_bias": qkv_bias, "max_position_embeddings": int(c.get("max_position_embeddings") or 4096)}
    if qk:
        extra["qk_layernorm"] = True
    extra.update({k: v for k, v in rope.items() if k != "rotary_base"})
    args = {**rope, "rotary_percent": 1.0,
            "norm_epsilon": float(c.get("rms_norm_eps", 1e-6)), "swiglu": True, "rotary_interleaved": False,
            "init_method_std": float(c.get("initializer_range", 0.02))}
    E, moe_ffn, ffn = 0, None, int(need("intermediate_size"))
    if mt == "mixtral":
        E, moe_ffn = int(need("num_local_experts")), ffn
        args.update(moe_router_topk=int(need("num_experts_per_tok")), moe_router_pre_softmax=False)
    elif mt in ("qwen2_moe", "qwen3_moe"):
        E, moe_ffn = int(need("num_experts")), int(need("moe_intermediate_size"))
        step, only = int(c.get("decoder_sparse_step", 1)), set(c.get("mlp_only_layers") or [])
        L = int(need("num_hidden_layers"))
        freq = [int(i not in only and (i + 1) % step == 0) for i in range(L)]
        extra.update(moe_layer_freq=1 if all(freq) else freq)
        args.update(moe_router_topk=int(need("num_experts_per_tok")),
                    moe_router_pre_softmax=not bool(c.get("norm_topk_prob", False)))
        if mt == "qwen2_moe":   # Qwen2-MoE always has a sigmoid-gated shared expert
            shared = int(need("shared_expert_intermediate_size"))
            extra.update(moe_shared_expert_intermediate_size=shared, moe_shared_expert_gate=True)
            args.update(moe_shared_expert_gate=True, moe_shared_expert_intermediate_size=shared)
        if not all(freq) and not any(freq):
            raise BadInput(f"{path}: no layer has experts (decoder_sparse_step / mlp_only_layers)")
    if moe:
        extra.update(moe_router_topk=args["moe_router_topk"])
    V = int(need("vocab_size"))
    cfg = ModelConfig(family="moe" if moe else "gpt", num_layers=int(need("num_hidden_layers")), hidden=H, heads=heads,
                      groups=groups, kv_channels=hn, ffn=ffn, glu=True, tied=bool(c.get("tie_word_embeddings", False)),
                      padded_vocab=None, true_vocab=V, vocab_divisor=128, num_experts=E, moe_ffn=moe_ffn, extra=extra)
    return cfg.family, arch, cfg, args
