"""Hugging Face -> Megatron from Python: `ckptctl convert HF_DIR DST --to LAYOUT [--to-format torch_dist]`.

The HF folder is a source format (`ckptctl.formats.hf.source`): the generic source phase, store and
target writers produce the checkpoint (a `release` checkpoint with weights only, so Megatron-LM loads
no optimizer or RNG state from it), with the padded vocabulary of the target's TP (zero rows).
"""
from __future__ import annotations

import json
from pathlib import Path

from ckptctl.layout import Layout
from ckptctl.models.config import padded_vocab


def import_hf(src: Path, dst: Path, layout: Layout, *, to_format: str = "legacy", overwrite: bool = False,
              nproc: int | None = None) -> dict:
    from ckptctl.convert import convert
    convert(Path(src), Path(dst), layout, to_format=to_format, nproc=nproc, overwrite=overwrite)
    V = int(json.loads((Path(src) / "config.json").read_text())["vocab_size"])
    return {"out": str(dst), "layout": str(layout), "format": to_format, "vocab": V,
            "padded_vocab": padded_vocab(V, 128, layout.tp)}
