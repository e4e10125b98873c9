"""The store's read interface over in-memory global arrays (`ckptctl example`'s source of truth, tests)."""
from __future__ import annotations

import torch


class MemoryStore:
    """The store interface over in-memory global arrays (the example's source of truth)."""

    refs = None     # no source bytes to reference (ckptctl.storage.zerocopy falls back to read())

    def __init__(self, arrays: dict[str, torch.Tensor]):
        self.arrays = arrays

    def read(self, name, box):
        return self.arrays[name][box.slices]
