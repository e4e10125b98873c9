"""`ckptctl plan`'s input: a model config file of Megatron-LM args (JSON or YAML, the names of Megatron-LM's
flags with `_`: num_layers, hidden_size, num_attention_heads, num_query_groups, ffn_hidden_size, num_experts,
moe_ffn_hidden_size, vocab_size, bf16, optimizer, use_distributed_optimizer, ...) read into the same
`ModelConfig` a checkpoint's args give (`config_from_args`), plus what the plan needs that args say
elsewhere: the parameter dtype and the optimizer state's components.

Multi-latent attention (MLA) and multi-token-prediction (MTP) layers are planned with their own rules
(ckptctl.models.deepseek), as convert moves them. Which spec the run used decides MLA's down-projections:
`transformer_impl: local` splits them over TP, anything else (Megatron-LM's default, transformer_engine)
replicates them on every TP rank.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from ckptctl.errors import BadInput
from ckptctl.models.config import ModelConfig, config_from_args, padded_vocab

MLA_DIMS = ("q_lora_rank", "kv_lora_rank", "qk_head_dim", "qk_pos_emb_head_dim", "v_head_dim")


@dataclass
class PlanInput:
    family: str
    cfg: ModelConfig                 # padded for the source TP
    dtype: str                       # parameter dtype (torch name)
    optim_kind: str | None           # "adam", "distributed" or None (no optimizer state)
    optim_comps: tuple[str, ...]     # fp32 arrays per parameter element: ("param", "exp_avg", "exp_avg_sq")
    notes: list[str] = field(default_factory=list)


def read_args(path: Path) -> dict:
    """The args dict of a JSON or YAML file; one-line BadInput naming the file otherwise."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as e:
        raise BadInput(f"{path}: cannot read the model config: {e.strerror or e}") from None
    try:
        if path.suffix.lower() in (".yaml", ".yml"):
            import yaml
            d = yaml.safe_load(text)
        else:
            d = json.loads(text)
    except Exception as e:  # noqa: BLE001 - any parse error is bad input naming the file
        raise BadInput(f"{path}: not a valid {'YAML' if path.suffix.lower() in ('.yaml', '.yml') else 'JSON'} "
                       f"model config: {str(e).splitlines()[0]}") from None
    if not isinstance(d, dict):
        raise BadInput(f"{path}: expected a mapping of Megatron-LM args, got {type(d).__name__}")
    return {k: v for k, v in d.items() if not k.startswith("_")}    # "_note" keys are comments


def param_dtype(args: dict) -> str:
    if args.get("bf16"):
        return "bfloat16"
    if args.get("fp16"):
        return "float16"
    name = str(args.get("params_dtype") or "float32").removeprefix("torch.")
    if name not in ("float32", "bfloat16", "float16"):
        raise BadInput(f"params_dtype {name!r}: expected float32, bfloat16 or float16")
    return name


def optimizer(args: dict, dtype: str, with_optimizer: bool) -> tuple[str | None, tuple[str, ...]]:
    """Megatron-LM's Adam state as ckptctl stores it: exp_avg and exp_avg_sq, plus an fp32 master where one
    exists apart from the weight (the distributed optimizer, or a bf16/fp16 model)."""
    if not with_optimizer:
        return None, ()
    kind = str(args.get("optimizer", "adam")).lower()
    if kind not in ("adam", "adamw"):
        raise BadInput(f"optimizer {kind!r}: ckptctl carries Adam state only (pass --no-optimizer to plan the weights)")
    dist = bool(args.get("use_distributed_optimizer"))
    master = dist or dtype != "float32"
    return ("distributed" if dist else "adam"), (("param",) if master else ()) + ("exp_avg", "exp_avg_sq")


def mla_attention_params(args: dict, hidden: int, heads: int) -> int:
    """Parameters of one megatron-core MLA attention block (MLASelfAttention's linear_q_down_proj,
    linear_q_up_proj, linear_kv_down_proj, linear_kv_up_proj, linear_proj and the q/kv layernorms)."""
    missing = [k for k in MLA_DIMS if not args.get(k)]
    if missing:
        raise BadInput(f"multi_latent_attention needs {', '.join(missing)} in the model config")
    q, kv, qk, rope, v = (int(args[k]) for k in MLA_DIMS)
    return (q * hidden + heads * (qk + rope) * q + (kv + rope) * hidden + heads * (qk + v) * kv
            + hidden * heads * v + q + kv)


def load(path: Path, src_tp: int, with_optimizer: bool = True) -> PlanInput:
    args = read_args(path)
    for need in ("num_layers", "hidden_size", "num_attention_heads", "vocab_size"):
        if args.get(need) is None:
            raise BadInput(f"{path}: the model config lacks {need!r}")
    notes = []
    hidden, heads = int(args["hidden_size"]), int(args["num_attention_heads"])
    if args.get("multi_latent_attention"):
        mla_attention_params(args, hidden, heads)     # the MLA sizes are all there (one-line error otherwise)
        if args.get("transformer_impl") != "local":
            notes.append("multi-latent attention under the TransformerEngine spec: its q/kv down-projections are "
                         "replicated on every TP rank (transformer_impl: local splits them)")
    family = args.pop("family", None)
    if family is None:
        from ckptctl.models import detect_family
        family = detect_family([], args)
    dtype = param_dtype(args)
    kind, comps = optimizer(args, dtype, with_optimizer)
    cfg = config_from_args(args, family)
    if cfg.true_vocab is None:
        raise BadInput(f"{path}: the model config lacks 'vocab_size'")
    cfg = ModelConfig(**{**cfg.__dict__, "padded_vocab": padded_vocab(cfg.true_vocab, cfg.vocab_divisor, src_tp)})
    return PlanInput(family, cfg, dtype, kind, comps, notes)
