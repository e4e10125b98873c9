"""Synthetic inventories: the key, shape and dtype lists a layout's rank files would hold, from a model
config alone (no tensor data, no checkpoint). The one rule that `ckptctl plan`, benchmarks/plan_scale.py
and the planner's scaling tests use to stand in for real files: the global model (every key at its full
shape, as `Family.global_keys` lists it in megatron-core's order) is planned onto the layout's files by
the planner itself, so the lists are exactly what a target phase would write.

Pure: imports neither torch nor zarr.
"""
from __future__ import annotations

from ckptctl.layout import FileCoord, Layout
from ckptctl.models.base import Family
from ckptctl.models.config import ModelConfig, padded_vocab
import ckptctl.reshard.plan as plan


def global_config(cfg: ModelConfig) -> ModelConfig:
    """`cfg` as one file holds it (TP1PP1): vocab padded for TP 1, no pipeline split."""
    pv = cfg.padded_vocab if cfg.true_vocab is None else padded_vocab(cfg.true_vocab, cfg.vocab_divisor, 1)
    extra = {k: v for k, v in cfg.extra.items() if k != "pipeline_model_parallel_layout"}
    return ModelConfig(**{**cfg.__dict__, "padded_vocab": pv, "first_stage_layers": None,
                          "last_stage_layers": None, "extra": extra})


def key_dtype(family: Family, key: str, dtype: str) -> str:
    """A model tensor's dtype: the parameters' `dtype`; megatron-core's router buffers (tensors without
    optimizer state: `router.expert_bias` ...) are fp32 whatever the model's dtype."""
    return dtype if family.optimizer_state(family.locate(key).rest) else "float32"


def global_plan(family: Family, cfg: ModelConfig, dtype: str) -> plan.SourcePlan:
    """The plan of one TP1PP1 file holding every key of the model at its full shape: parameters in `dtype`,
    buffers as megatron-core keeps them (`key_dtype`)."""
    one = global_config(cfg)
    keys = family.global_keys(one)
    inv = plan.Inventory(FileCoord(0, 0), "global",
                         {"model": [(k, s, None if s is None else key_dtype(family, k, dtype)) for k, s in keys]})
    return plan.plan_source(family, one, Layout(), [inv])


def inventories(family: Family, cfg: ModelConfig, layout: Layout, dtype: str = "bfloat16",
                glob: plan.SourcePlan | None = None) -> list[plan.Inventory]:
    """Every rank file's (key, shape, dtype) list of `layout`, in file order, as the planner reads them
    from real files. `glob`: a `global_plan` already made (it does not depend on the layout)."""
    g = glob or global_plan(family, cfg, dtype)
    files = plan.plan_target(family, cfg, layout, g.manifest, g.arrays, set())
    return [plan.Inventory(f.coord, f.dirname, {
        c: [(i.key, i.shape, i.dtype) if isinstance(i, plan.TensorItem) else (i.key, None, None)
            for i in f.items if i.chunk == c] for c in f.chunks}) for f in files]


def frontier_moe() -> ModelConfig:
    """The 61-layer, 256-expert MoE of benchmarks/plan_scale.py (DeepSeek-V3's sizes; GQA standing in for
    MLA): hidden 7168, first 3 layers dense, a shared expert, the router's expert bias, split 3/.../2."""
    return ModelConfig(
        family="moe", num_layers=61, hidden=7168, heads=128, groups=8, kv_channels=128, ffn=18432, glu=True,
        tied=False, padded_vocab=129280, true_vocab=129280, vocab_divisor=128, num_experts=256, moe_ffn=2048,
        first_stage_layers=3, last_stage_layers=2,
        extra={"add_bias_linear": False, "normalization": "RMSNorm", "position_embedding_type": "rope",
               "moe_layer_freq": [0] * 3 + [1] * 58, "moe_shared_expert_intermediate_size": 2048,
               "moe_router_enable_expert_bias": True})
