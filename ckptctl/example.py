"""`ckptctl example`: a small checkpoint in Megatron's legacy format, filled with random values.

The model's global tensors are made once (as a TP1PP1 source would hold them), planned like any
source, and written to the requested layout through the same target writer `convert` uses.
"""
from __future__ import annotations

import argparse
import random
import shutil
import uuid
from pathlib import Path

import numpy as np
import torch

from ckptctl.errors import BadInput
from ckptctl.formats import legacy
from ckptctl.layout import FileCoord, Layout
from ckptctl.models import get_family
from ckptctl.models.config import ModelConfig, padded_vocab
from ckptctl.reshard.plan import Inventory, plan_source, plan_target
from ckptctl.reshard.run import Progress, build_file

DEFAULTS = {"layers": 8, "hidden": 64, "heads": 8, "groups": None, "ffn": 128, "vocab": 128, "swiglu": False,
            "tied": False, "seq": 64, "bias": True, "dtype": "float32", "experts": 0, "moe_ffn": None}


class MemoryStore:
    """The store interface over in-memory global arrays (the example's source of truth)."""

    def __init__(self, arrays: dict[str, torch.Tensor]):
        self.arrays = arrays

    def read(self, name, box):
        return self.arrays[name][box.slices]


def make_args(cfg: ModelConfig, layout: Layout, dtype: str, seq: int, bias: bool) -> argparse.Namespace:
    """The Megatron-LM args fields that describe the model and the layout (names as arguments.py)."""
    return argparse.Namespace(
        num_layers=cfg.num_layers, hidden_size=cfg.hidden, ffn_hidden_size=cfg.ffn,
        num_attention_heads=cfg.heads, num_query_groups=cfg.groups, group_query_attention=cfg.groups != cfg.heads,
        kv_channels=cfg.kv_channels, swiglu=cfg.glu, untie_embeddings_and_output_weights=not cfg.tied,
        padded_vocab_size=cfg.padded_vocab, vocab_size=cfg.true_vocab,
        make_vocab_size_divisible_by=cfg.vocab_divisor, max_position_embeddings=seq, seq_length=seq,
        position_embedding_type=cfg.extra.get("position_embedding_type", "learned_absolute"),
        normalization=cfg.extra.get("normalization", "LayerNorm"), add_bias_linear=bias, add_qkv_bias=bool(cfg.extra.get("add_qkv_bias", bias)), qk_layernorm=bool(cfg.extra.get("qk_layernorm")),
        tensor_model_parallel_size=layout.tp, pipeline_model_parallel_size=layout.pp,
        virtual_pipeline_model_parallel_size=layout.vpp if layout.vpp > 1 else None,
        num_layers_per_virtual_pipeline_stage=cfg.num_layers // (layout.pp * layout.vpp) if layout.vpp > 1 else None,
        expert_model_parallel_size=layout.ep, expert_tensor_parallel_size=layout.expert_tp,
        context_parallel_size=layout.cp, data_parallel_size=layout.dp, world_size=layout.world,
        num_experts=cfg.num_experts or None, moe_ffn_hidden_size=cfg.moe_ffn,
        sequence_parallel=False, params_dtype=getattr(torch, dtype), bf16=dtype == "bfloat16",
        fp16=dtype == "float16", use_distributed_optimizer=False, ckpt_format="torch",
        **{k: v for k, v in cfg.extra.items() if k not in ("position_embedding_type", "add_bias_linear", "normalization",
                                                          "max_position_embeddings", "qk_layernorm",
                                                          "add_qkv_bias")},
    )


def make_config(family: str, opts: dict) -> ModelConfig:
    fam = get_family(family)
    o = {**DEFAULTS, **fam.example_defaults, **{k: v for k, v in opts.items() if v is not None}}
    heads = o["heads"]
    extra = {"add_bias_linear": o["bias"], "max_position_embeddings": o["seq"],
             "position_embedding_type": "learned_absolute"}
    if o.get("position"):   # families with their own choices (T5) check and override it below
        extra["position_embedding_type"] = o["position"]
    if o.get("norm"):
        if o["norm"] not in ("LayerNorm", "RMSNorm"):
            raise BadInput(f"--norm: expected LayerNorm or RMSNorm, got {o['norm']!r}")
        extra["normalization"] = o["norm"]
    if o.get("qkv_bias") is not None:
        extra["add_qkv_bias"] = bool(o["qkv_bias"])
    extra.update(fam.example_extra(o))
    extra.update(o.get("extra") or {})
    return ModelConfig(
        family=family, num_layers=o["layers"], hidden=o["hidden"], heads=heads, groups=o["groups"] or heads,
        kv_channels=o["hidden"] // heads, ffn=o["ffn"], glu=o["swiglu"], tied=o["tied"],
        padded_vocab=None, true_vocab=o["vocab"], vocab_divisor=128, num_experts=o["experts"],
        moe_ffn=o["moe_ffn"], extra=extra)


def example(family: str, layout: Layout, out: Path, opts: dict | None = None, seed: int = 1234,
            overwrite: bool = False, optimizer: str | None = None) -> dict:
    """`optimizer`: none, adam or distributed (default: distributed when DP > 1, else adam)."""
    from ckptctl import optim
    opts = dict(opts or {})
    optimizer = optimizer or optim.default_kind(layout)
    if optimizer not in optim.KINDS:
        raise BadInput(f"--optimizer: expected one of {', '.join(optim.KINDS)}, got {optimizer!r}")
    dtype = opts.get("dtype") or DEFAULTS["dtype"]
    fam = get_family(family)
    cfg = make_config(family, opts)
    cfg = ModelConfig(**{**cfg.__dict__, "padded_vocab": padded_vocab(cfg.true_vocab, cfg.vocab_divisor, layout.tp)})
    fam.validate(cfg, layout)
    out = Path(out)
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise BadInput(f"destination {out} exists and is not empty (use --overwrite)")
    # The global model as a single TP1PP1 file, planned like any source.
    one = Layout(ep=1)
    base_cfg = ModelConfig(**{**cfg.__dict__, "padded_vocab": padded_vocab(cfg.true_vocab, cfg.vocab_divisor, 1)})
    keys = fam.global_keys(base_cfg)
    inv = Inventory(FileCoord(0, 0), "global", {"model": [(k, s, None if s is None else dtype) for k, s in keys]})
    src = plan_source(fam, base_cfg, one, [inv])
    gen = torch.Generator().manual_seed(seed)
    arrays = {}
    for name, spec in src.arrays.items():
        t = torch.randn(spec["shape"], generator=gen, dtype=torch.float32) * 0.02
        arrays[name] = t.to(getattr(torch, spec["dtype"]))
    # The padded vocab at the example's TP: rows past the true vocab are zero, as Megatron initialises them
    # before training moves them.
    files = plan_target(fam, cfg, layout, src.manifest, src.arrays, set())
    store = MemoryStore(arrays)
    args = make_args(cfg, layout, dtype, int(cfg.extra.get("max_position_embeddings", 64)), bool(cfg.extra.get("add_bias_linear", True)))
    args = argparse.Namespace(**fam.layout_args(vars(args), cfg, layout))
    common = {"args": args, "checkpoint_version": 3.0, "iteration": 10,
              # the keys Megatron-LM's OptimizerParamScheduler.state_dict() writes
              "opt_param_scheduler": {"max_lr": 3e-4, "lr_warmup_steps": 2, "num_steps": 10,
                                      "lr_decay_style": "cosine", "lr_decay_steps": 100, "min_lr": 3e-5,
                                      "start_wd": 0.1, "end_wd": 0.1, "wd_incr_style": "constant",
                                      "wd_incr_steps": 100},
              "num_floating_point_operations_so_far": 1.0e12}
    tside = None
    if optimizer != "none":
        oarrays, ocommon, oinfo = optim.example_state(optimizer, fam, cfg, layout, src, arrays, dtype, gen)
        vars(args).update({k: v for k, v in optim.EXAMPLE_ARGS.items()})
        args.use_distributed_optimizer = optimizer == "distributed"
        tside = optim.TargetSide(fam, cfg, layout, oinfo, ocommon)
        ostore = MemoryStore(oarrays)
    tmp = out.with_name(f".{out.name}.ckptctl-{uuid.uuid4().hex[:8]}")
    it_dir = tmp / legacy.iter_dirname(10)
    try:
        for fp in files:
            sd = build_file(store, fp, common, {}, Progress(None, 0))
            sd["rng_state"] = [_rng_state(seed + fp.coord.tp + 100 * fp.coord.pp)]
            (it_dir / fp.dirname).mkdir(parents=True)
            if tside is not None:
                tside.write(ostore, fp, sd, it_dir / fp.dirname)
            legacy.save_pt(sd, it_dir / fp.dirname / legacy.MODEL_FILE)
        legacy.write_tracker(tmp, 10)
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return {"family": family, "layout": str(layout), "out": str(out), "files": len(files), "optimizer": optimizer,
            "bytes": sum(f.nbytes() for f in files), "config": cfg.to_json()}


def _rng_state(seed: int) -> dict:
    """An RNG state shaped like Megatron-LM's `get_rng_state` entry (without CUDA)."""
    r = random.Random(seed)
    g = torch.Generator().manual_seed(seed)
    return {"random_rng_state": r.getstate(), "np_rng_state": np.random.RandomState(seed).get_state(),
            "torch_rng_state": g.get_state(), "cuda_rng_state": torch.zeros(16, dtype=torch.uint8),
            "rng_tracker_states": {}}
