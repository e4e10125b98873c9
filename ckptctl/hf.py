"""Hugging Face export and import from Python: `convert` to and from the `hf` format (`ckptctl.formats.hf`),
with the workers, store, checks and commit of `ckptctl convert SRC OUT --to-format hf` and
`ckptctl convert HF_DIR DST --to LAYOUT`. A command-level API: the format package itself never calls convert.

Import: the HF folder is a source format (`ckptctl.formats.hf.source`): the generic source phase, store and
target writers produce the checkpoint (a `release` checkpoint with weights only, so Megatron-LM loads no
optimizer or RNG state from it), with the padded vocabulary of the target's TP (zero rows).
"""
from __future__ import annotations

import json
from pathlib import Path

from ckptctl.convert import convert
from ckptctl.formats.hf import files as hf_files
from ckptctl.layout import Layout
from ckptctl.models.config import padded_vocab


def export_checkpoint(src: Path, out: Path, *, true_vocab: int | None = None, nproc: int | None = None,
                      dtype: str | None = None, hf_arch: str | None = None, shard_size=None,
                      overwrite: bool = False, token_ids: dict | None = None) -> dict:
    """Any Megatron checkpoint (legacy, torch_dist, any layout) or store -> HF folder: `ckptctl convert SRC
    OUT --to-format hf` (its workers, store, memory budget, checks and commit)."""
    opts = {k: v for k, v in (("dtype", dtype), ("arch", hf_arch), ("shard_size", shard_size)) if v is not None}
    opts.update(token_ids or {})
    convert(Path(src), Path(out), None, to_format="hf", true_vocab=true_vocab, nproc=nproc, overwrite=overwrite,
            format_options=opts)
    conf = json.loads((Path(out) / hf_files.CONFIG).read_text())
    names = sorted(p.name for p in Path(out).glob("*.safetensors"))
    return {"out": str(out), "files": names, "architecture": conf["architectures"][0],
            "model_type": conf["model_type"], "vocab": conf["vocab_size"], "dtype": conf["dtype"]}


def import_hf(src: Path, dst: Path, layout: Layout, *, to_format: str = "legacy", overwrite: bool = False,
              nproc: int | None = None, fresh_optimizer: str | None = None, moe_grouped_gemm: bool = False) -> dict:
    """`fresh_optimizer`: `KIND[,key=value...]` (`ckptctl.formats.hf.fresh`): an iteration-0 checkpoint with
    the optimizer state a fresh run holds; None: a release checkpoint with weights only. `moe_grouped_gemm`:
    experts written with TE grouped-GEMM keys (`experts.linear_fc1.weight{j}`), else SequentialMLP."""
    convert(Path(src), Path(dst), layout, to_format=to_format, nproc=nproc, overwrite=overwrite,
            fresh_optimizer=fresh_optimizer, moe_grouped_gemm=moe_grouped_gemm)
    V = int(json.loads((Path(src) / "config.json").read_text())["vocab_size"])
    return {"out": str(dst), "layout": str(layout), "format": to_format, "vocab": V,
            "padded_vocab": padded_vocab(V, 128, layout.tp)}
