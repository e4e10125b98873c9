"""The name map: every Hugging Face tensor as a view of one Megatron global tensor (store array).

An `Entry` says which store array an HF tensor comes from and which part of it: `steps` applied in
order, each a view (no arithmetic), so the same function exports (view -> contiguous copy) and imports
(view <- copy_): every rule is written once and both directions move bytes only.

- ("expert", e): expert e of a stacked expert array (axis 0 = global expert, DESIGN §5)
- ("half", i):   half i of a GLU fc1 `[W; V]` (gate = W, up = V; megatron-core computes silu(W x) * V x)
- ("qkv", p):    p in q/k/v of a fused QKV, rows grouped per query group as megatron-core lays them out:
                 `[q_1 .. q_{np/ng}, k, v]` per group, each `hn` rows (DESIGN §4.1)
- ("rows", V):   the first V rows (the true vocabulary; padding rows are not exported)
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ckptctl.errors import BadInput
from ckptctl.formats.hf.arch import Arch
from ckptctl.models.config import ModelConfig


@dataclass(frozen=True)
class Entry:
    hf: str               # HF tensor name
    array: str            # store array, `model/<Megatron key>`
    steps: tuple = ()


def view(t: torch.Tensor, steps: tuple, cfg: ModelConfig) -> torch.Tensor:
    """The part of global tensor `t` an entry names, as a view of `t` (writable for imports)."""
    for step in steps:
        kind, arg = step
        if kind == "expert":
            t = t[arg]
        elif kind == "rows":
            t = t[:arg]
        elif kind == "half":
            n = t.shape[0] // 2
            t = t[:n] if arg == 0 else t[n:]
        elif kind == "qkv":
            ng, r, hn = cfg.groups, cfg.heads // cfg.groups, cfg.kv_channels
            g = t.view(ng, r + 2, hn, *t.shape[1:])
            t = {"q": g[:, :r], "k": g[:, r:r + 1], "v": g[:, r + 1:]}[arg]
        else:  # pragma: no cover - entries are built below
            raise ValueError(step)
    return t


def hf_shape(shape: tuple, steps: tuple, cfg: ModelConfig) -> tuple:
    """The HF tensor's shape: the view's elements as one row block (q/k/v flatten their group axes)."""
    shape = list(shape)
    for kind, arg in steps:
        if kind == "expert":
            shape = shape[1:]
        elif kind == "rows":
            shape[0] = arg
        elif kind == "half":
            shape[0] //= 2
        elif kind == "qkv":
            r, hn = cfg.heads // cfg.groups, cfg.kv_channels
            shape[0] = cfg.groups * hn * (r if arg == "q" else 1)
    return tuple(shape)


def _first(arrays, *names: str) -> str | None:
    for n in names:
        if f"model/{n}" in arrays:
            return f"model/{n}"
    return None


def entries(arch: Arch, cfg: ModelConfig, arrays: dict, vocab: int) -> list[Entry]:
    """Every HF tensor of the model in the order HF lists them, from the store's arrays (name -> spec).

    Store arrays no entry uses are refused by `check_covered`; names follow whichever spec the source
    used (local `input_layernorm` or TE's fused `linear_qkv.layer_norm_weight`)."""
    out = [Entry("model.embed_tokens.weight", "model/embedding.word_embeddings.weight", (("rows", vocab),))]
    from ckptctl.models.moe import moe_layers
    is_moe = moe_layers(cfg) if cfg.num_experts else [False] * cfg.num_layers
    for i in range(cfg.num_layers):
        L, H = f"decoder.layers.{i}.", f"model.layers.{i}."

        def need(*names):
            a = _first(arrays, *[L + n for n in names])
            if a is None:
                raise BadInput(f"the store has no {L + names[0]} (layer {i}): not a complete {arch.model_type} model")
            return a

        out.append(Entry(H + "input_layernorm.weight",
                         need("input_layernorm.weight", "self_attention.linear_qkv.layer_norm_weight")))
        qkv = need("self_attention.linear_qkv.weight")
        for p in "qkv":
            out.append(Entry(H + f"self_attn.{p}_proj.weight", qkv, (("qkv", p),)))
            if arch.qkv_bias:
                out.append(Entry(H + f"self_attn.{p}_proj.bias", need("self_attention.linear_qkv.bias"), (("qkv", p),)))
        out.append(Entry(H + "self_attn.o_proj.weight", need("self_attention.linear_proj.weight")))
        if arch.o_bias:
            out.append(Entry(H + "self_attn.o_proj.bias", need("self_attention.linear_proj.bias")))
        if arch.qk_norm:   # megatron-core's per-head q/k_layernorm = Qwen3's q_norm / k_norm (before RoPE)
            for p in "qk":
                out.append(Entry(H + f"self_attn.{p}_norm.weight", need(f"self_attention.{p}_layernorm.weight")))
        out.append(Entry(H + "post_attention_layernorm.weight",
                         need("pre_mlp_layernorm.weight", "mlp.linear_fc1.layer_norm_weight")))
        if is_moe[i]:
            out += _moe(arch, cfg, H, need)
        else:
            out += _mlp(H + "mlp.", "mlp.", need, arch.mlp_bias)
    out.append(Entry("model.norm.weight", _first(arrays, "decoder.final_layernorm.weight", "decoder.final_norm.weight")
                     or "model/decoder.final_layernorm.weight"))
    if not cfg.tied:
        out.append(Entry("lm_head.weight", "model/output_layer.weight", (("rows", vocab),)))
    return out


def _mlp(h: str, m: str, need, bias: bool, names=("gate_proj", "up_proj", "down_proj"), pre=()) -> list[Entry]:
    """A gated MLP: HF prefix `h`, Megatron module `m` (relative to the layer), `pre`: steps before the split."""
    gate, up, down = names
    fc1, fc2 = need(m + "linear_fc1.weight"), need(m + "linear_fc2.weight")
    out = [Entry(h + f"{gate}.weight", fc1, pre + (("half", 0),))]
    if bias:
        out.append(Entry(h + f"{gate}.bias", need(m + "linear_fc1.bias"), pre + (("half", 0),)))
    out.append(Entry(h + f"{up}.weight", fc1, pre + (("half", 1),)))
    if bias:
        out.append(Entry(h + f"{up}.bias", need(m + "linear_fc1.bias"), pre + (("half", 1),)))
    out.append(Entry(h + f"{down}.weight", fc2, pre))
    if bias:
        out.append(Entry(h + f"{down}.bias", need(m + "linear_fc2.bias"), pre))
    return out


def _moe(arch: Arch, cfg: ModelConfig, H: str, need) -> list[Entry]:
    if arch.model_type == "mixtral":
        blk, names = H + "block_sparse_moe.", ("w1", "w3", "w2")
    else:
        blk, names = H + "mlp.", ("gate_proj", "up_proj", "down_proj")
    out = [Entry(blk + "gate.weight", need("mlp.router.weight"))]
    for e in range(cfg.num_experts):
        out += _mlp(blk + f"experts.{e}.", "mlp.experts.", need, False, names, (("expert", e),))
    if arch.shared:
        out += _mlp(blk + "shared_expert.", "mlp.shared_experts.", need, False)
        out.append(Entry(blk + "shared_expert_gate.weight", need("mlp.shared_experts.gate_weight")))
    return out


def check_covered(ents: list[Entry], arrays: dict, arch: Arch) -> None:
    """Every store array must feed some HF tensor: one that does not (a bias, a norm bias, an expert
    bias, learned positions, a softmax offset ...) has no place in the HF model: refuse, naming it."""
    used = {e.array for e in ents}
    for name in arrays:
        if name.startswith("model/") and name not in used:
            raise BadInput(f"cannot export as {arch.model_type} exactly: tensor {name[6:]!r} has no Hugging Face "
                           "counterpart")
