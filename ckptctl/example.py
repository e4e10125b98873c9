"""`ckptctl example`: a small checkpoint filled with random values, in any registered format.

The model's global tensors (and optimizer state) are made once, as a TP1PP1 source would hold them, and
planned like any source; the format examples are written in (`registry.example_writer`) writes them to the
requested layout through the same file builder the target phase uses. Any other format is that example
converted (`convert`), in this process.
"""
from __future__ import annotations

import shutil
import uuid
from pathlib import Path

import torch

from ckptctl.errors import BadInput
from ckptctl.formats import registry
from ckptctl.formats.megatron import make_args, rng_state as _rng_state  # noqa: F401 - stage 2: callers move
from ckptctl.layout import FileCoord, Layout
from ckptctl.models import get_family
from ckptctl.models.config import ModelConfig, padded_vocab
from ckptctl.optstate.example import default_kind, example_state
from ckptctl.optstate.params import KINDS
from ckptctl.reshard.plan import Inventory, plan_source
from ckptctl.storage.commit import folder_beside
from ckptctl.storage.memory import MemoryStore  # noqa: F401 - stage 2: callers move

DEFAULTS = {"layers": 8, "hidden": 64, "heads": 8, "groups": None, "ffn": 128, "vocab": 128, "swiglu": False,
            "tied": False, "seq": 64, "bias": True, "dtype": "float32", "experts": 0, "moe_ffn": None}


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
            overwrite: bool = False, optimizer: str | None = None, fmt: str | None = None,
            optim_sharding: str | None = None) -> dict:
    """`optimizer`: none, adam or distributed (default: distributed when DP > 1, else adam; none in a format
    the example is converted to). `fmt`: the format (default: the one examples are written in)."""
    writer = registry.example_writer()
    target = registry.get(registry.canonical(fmt) or writer.name)
    out = Path(out)
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise BadInput(f"destination {out} exists and is not empty (use --overwrite)")
    if target is not writer:
        return _converted(target, family, layout, out, opts, seed, overwrite, optimizer, optim_sharding)
    opts = dict(opts or {})
    optimizer = optimizer or default_kind(layout)
    if optimizer not in KINDS:
        raise BadInput(f"--optimizer: expected one of {', '.join(KINDS)}, got {optimizer!r}")
    dtype = opts.get("dtype") or DEFAULTS["dtype"]
    fam = get_family(family)
    cfg = make_config(family, opts)
    cfg = ModelConfig(**{**cfg.__dict__, "padded_vocab": padded_vocab(cfg.true_vocab, cfg.vocab_divisor, layout.tp)})
    fam.validate(cfg, layout)
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
    optim = example_state(optimizer, fam, cfg, layout, src, arrays, dtype, gen) if optimizer != "none" else None
    with folder_beside(out) as tmp:
        tmp.mkdir(parents=True)
        res = writer.write_example(fam, cfg, layout, tmp, src, arrays, dtype, seed, optim)
    return {"family": family, "layout": str(layout), "out": str(out), "files": res["files"], "optimizer": optimizer,
            "bytes": res["bytes"], "config": cfg.to_json()}


def _converted(target, family: str, layout: Layout, out: Path, opts, seed: int, overwrite: bool,
               optimizer: str | None, optim_sharding: str | None) -> dict:
    """The example in the format examples are written in, converted to `target` in this process."""
    from ckptctl.convert import convert
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.example-{uuid.uuid4().hex[:8]}")
    try:
        res = example(family, layout, tmp, opts, seed=seed, optimizer=optimizer or "none")
        rep = convert(tmp, out, layout, nproc=0, overwrite=overwrite, to_format=target.name,
                      optim_sharding=optim_sharding)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return {**res, "out": str(out), "format": target.name, "files": rep.files_out, "notes": rep.notes}
