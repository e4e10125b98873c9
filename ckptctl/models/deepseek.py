"""DeepSeek-V3-class layer parts (DESIGN §4.2): multi-latent attention (MLA) and multi-token prediction (MTP).

Read from megatron-core 0.19.2 (transformer/multi_latent_attention.py, multi_token_prediction.py,
models/gpt/gpt_layer_specs.py) and pinned by tests/test_mla_mtp_mcore.py (megatron-core builds both on CPU).

MLA (`MLASelfAttention`, below `self_attention.`):
- `linear_q_proj` (no q LoRA), `linear_q_up_proj`, `linear_kv_up_proj`: ColumnParallel, rows are per-head blocks
  (`np*(qk_head_dim+qk_pos_emb_head_dim)`, `np*(qk_head_dim+v_head_dim)`): plain dim-0 split over TP.
- `linear_q_down_proj` (`q_lora_rank` rows), `linear_kv_down_proj` (`kv_lora_rank+qk_pos_emb_head_dim` rows):
  the local spec builds them ColumnParallel (the runtime all-gathers the output): dim-0 split. The
  TransformerEngine spec builds TELinear with parallel_mode='duplicated': every TP rank holds the whole
  tensor. Which one is in the files is the run's `--transformer-impl` (args `transformer_impl`; Megatron-LM's
  default is transformer_engine).
- `q_layernorm` (`q_lora_rank`), `kv_layernorm` (`kv_lora_rank`), or with TE specs the same norms fused into the
  up-projections as `layer_norm_weight`: replicated.
- `linear_proj`: RowParallel over `np*v_head_dim` columns (GPT's rule).
- RoPE / YaRN keep no tensors in the state dict (`inv_freq` is a plain attribute, the cos/sin caches are
  non-persistent buffers).
- `linear_qkv_down_proj` (FusedMLASelfAttention, `mla_down_proj_fusion`): refused (its sharded state dict
  splits one local tensor into two keys; not pinned).

MTP (`mtp.layers.<i>.`, `MultiTokenPredictionLayer`): `enorm`, `hnorm`, `final_layernorm` replicated; `eh_proj`
ColumnParallel `(H, 2H)`: dim-0 split; the inner transformer layer is `mtp_model_layer.<layer key>` in 0.19.2's
legacy files (`transformer_layer.` in older ones and in every torch_dist checkpoint: megatron-core maps the
prefix in `sharded_state_dict`; ckptctl reads both and names it `mtp_model_layer.` in the store and legacy targets), built from the spec of the *last* decoder layer (dense or MoE alike). All MTP
layers live on the last pipeline stage's last virtual chunk (an explicit pipeline layout with 'm' is refused);
`mtp_use_repeated_layer` builds one layer for every depth. The MTP stage keeps its own copy of the word
embedding when it is not the first chunk (tied to the first stage's like a tied output layer); torch_dist saves
it as a replica of `embedding.word_embeddings.weight`. Layer keys are numbered `mtp.layers.<i>` in torch_dist
(never stacked), `i` the global MTP depth.
"""
from __future__ import annotations

import re

from ckptctl.errors import BadInput, LayoutError
from ckptctl.layout import Layout
from ckptctl.models.config import ModelConfig
from ckptctl.models.rules import REPLICATED, SPLIT, Rule

_R = Rule(REPLICATED)
_COL = Rule(SPLIT, dim=0)
INNER = ("mtp_model_layer", "transformer_layer")   # the inner layer's prefix: 0.19.2 legacy, older/torch_dist
MTP_STACK = "mtp"


def is_mla(cfg: ModelConfig) -> bool:
    return bool(cfg.extra.get("multi_latent_attention"))


def down_proj_rule(cfg: ModelConfig) -> Rule:
    """Local spec: ColumnParallelLinear (split); TransformerEngine spec: TELinear 'duplicated' (replicated)."""
    return _COL if cfg.extra.get("transformer_impl") == "local" else _R


def _fused(cfg):
    raise BadInput("MLA with a fused q/kv down-projection (linear_qkv_down_proj, --mla-down-proj-fusion) is not "
                   "supported: save without the fusion")


MLA_RULES = [(re.compile(p), r) for p, r in [
    (r"self_attention\.(linear_q_proj|linear_q_up_proj|linear_kv_up_proj)\.weight", _COL),
    (r"self_attention\.(linear_q_up_proj|linear_kv_up_proj)\.layer_norm_(weight|bias)", _R),
    (r"self_attention\.(linear_q_down_proj|linear_kv_down_proj)\.weight", down_proj_rule),
    (r"self_attention\.kv_layernorm\.(weight|bias)", _R),
    (r"self_attention\.linear_qkv_down_proj\..*", _fused),
]]

# below `mtp.layers.<i>.`, besides the inner layer
MTP_RULES = [(re.compile(p), r) for p, r in [
    (r"(enorm|hnorm|final_layernorm)\.(weight|bias)", _R),
    (r"eh_proj\.weight", _COL),
]]
_INNER = re.compile(r"^(?:%s)\.(?P<rest>.+)$" % "|".join(INNER))


def inner_rest(rest: str) -> str | None:
    """The transformer-layer key inside an MTP layer's key (`mtp_model_layer.<rest>`), or None."""
    m = _INNER.match(rest)
    return m["rest"] if m else None


def canonical_mtp_rest(rest: str) -> str:
    """The store (and every legacy target) names the inner layer as megatron-core 0.19.2 does: `mtp_model_layer.`."""
    for old in INNER[1:]:
        if rest.startswith(old + "."):
            return INNER[0] + rest[len(old):]
    return rest


def mtp_layers(cfg: ModelConfig) -> int:
    """MTP layers the checkpoint holds (one for every depth with `mtp_use_repeated_layer`)."""
    n = int(cfg.extra.get("mtp_num_layers") or 0)
    return min(n, 1) if cfg.extra.get("mtp_use_repeated_layer") else n


def mtp_ranges(cfg: ModelConfig, layout: Layout) -> list[list[range]]:
    """Every MTP layer on the last chunk of the last stage (megatron-core without an explicit layout)."""
    out = [[range(0)] * layout.vpp for _ in range(layout.pp)]
    out[-1][-1] = range(mtp_layers(cfg))
    return out


def embedding_copy_on_mtp_stage(cfg: ModelConfig, layout: Layout) -> bool:
    """Whether the MTP chunk keeps its own word embedding (it is not the first chunk)."""
    return bool(mtp_layers(cfg)) and layout.pp * layout.vpp > 1


def validate(cfg: ModelConfig, layout: Layout) -> None:
    tp = layout.tp
    if is_mla(cfg):
        if cfg.extra.get("mla_down_proj_fusion"):
            _fused(cfg)
        if cfg.extra.get("transformer_impl") == "local":   # ColumnParallel down-projections divide their rows
            q = cfg.extra.get("q_lora_rank")
            kv = int(cfg.extra.get("kv_lora_rank") or 0) + int(cfg.extra.get("qk_pos_emb_head_dim") or 0)
            for what, n in (("q_lora_rank", q), ("kv_lora_rank + qk_pos_emb_head_dim", kv)):
                if n and int(n) % tp:
                    raise LayoutError(f"MLA {what} = {n} is not divisible by TP = {tp} (local-spec down-projections "
                                      "are column-parallel)")
    if mtp_layers(cfg):
        from ckptctl.pipeline import split_of
        if split_of(cfg, layout).layout:
            raise LayoutError("MTP layers with an explicit pipeline layout are not supported (megatron-core places "
                              "them by the layout's 'm' entries)")
        if (cfg.extra.get("position_embedding_type", "learned_absolute") == "learned_absolute"
                and layout.pp * layout.vpp > 1):
            raise LayoutError("MTP with learned absolute position embeddings at PP*VPP > 1 is not supported (the MTP "
                              "stage's position embedding is not tied to the first stage's)")


# --- a fresh model's keys, for `ckptctl example` (megatron-core 0.19.2 local-spec state-dict order) ---

def mla_attention_keys(cfg: ModelConfig, linear, norm_keys, bias: bool) -> list[tuple[str, tuple[int, ...] | None]]:
    """`linear(prefix, wshape, bias, bshape)` and `norm_keys(prefix, cfg, size)` are GPT's builders."""
    H, n = cfg.hidden, cfg.heads
    e = cfg.extra
    qk, pe, v = int(e.get("qk_head_dim", 128)), int(e.get("qk_pos_emb_head_dim", 64)), int(e.get("v_head_dim", 128))
    q_rank, kv_rank = e.get("q_lora_rank"), int(e.get("kv_lora_rank", 512))
    keys = linear("self_attention.linear_proj", (H, n * v), bias, (H,))
    if q_rank is None:
        keys += linear("self_attention.linear_q_proj", (n * (qk + pe), H), False, None)
    else:
        keys += linear("self_attention.linear_q_down_proj", (int(q_rank), H), False, None)
        keys += linear("self_attention.linear_q_up_proj", (n * (qk + pe), int(q_rank)), False, None)
    keys += linear("self_attention.linear_kv_down_proj", (kv_rank + pe, H), False, None)
    keys += linear("self_attention.linear_kv_up_proj", (n * (qk + v), kv_rank), False, None)
    if e.get("qk_layernorm"):
        if q_rank is not None:
            keys += norm_keys("self_attention.q_layernorm", cfg, size=int(q_rank))
        keys += norm_keys("self_attention.kv_layernorm", cfg, size=kv_rank)
    return keys


def mtp_layer_keys(cfg: ModelConfig, i: int, inner, linear, norm_keys) -> list[tuple[str, tuple[int, ...] | None]]:
    """Keys of MTP layer `i`; `inner` are the transformer layer's keys (relative)."""
    H, p = cfg.hidden, f"{MTP_STACK}.layers.{i}."
    keys = norm_keys(p + "enorm", cfg) + norm_keys(p + "hnorm", cfg)
    keys += linear(p + "eh_proj", (H, 2 * H), False, None)
    keys += [(f"{p}{INNER[0]}.{k}", s) for k, s in inner]
    keys += norm_keys(p + "final_layernorm", cfg)
    return keys


def example_extra(opts: dict) -> dict:
    """args fields of `ckptctl example ... --mla --mtp N` (small DeepSeek-V3 shapes, local spec)."""
    out: dict = {}
    if opts.get("mla"):
        out.update(multi_latent_attention=True, transformer_impl="local", q_lora_rank=32, kv_lora_rank=16,
                   qk_head_dim=8, qk_pos_emb_head_dim=4, v_head_dim=8, qk_layernorm=True,
                   position_embedding_type="rope")
    if opts.get("mtp"):
        out.update(mtp_num_layers=int(opts["mtp"]), position_embedding_type="rope")
    return out
