"""Inspecting a legacy checkpoint (CLI process): every rank file's key lists (tensors stay on disk,
memory-mapped), the config, family and source plan, and the optimizer variant. No tensor is copied."""
from __future__ import annotations

from pathlib import Path

from ckptctl.formats.base import Source
from ckptctl.formats.legacy.files import inventory, open_legacy
from ckptctl.formats.legacy.lite import source_of
from ckptctl.formats.legacy.optim_codec import detect
from ckptctl.storage.pickles import load_pt


def inspect(src: Path, true_vocab: int | None = None, family: str | None = None) -> Source:
    # one Source builder for this reader and the torch-free one (`lite.source_of`, a module without torch)
    return source_of(open_legacy(Path(src)), load_pt, detect, inventory, true_vocab, family)
