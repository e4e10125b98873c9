"""Where a torch_dist tensor chunk's bytes lie inside its `.distcp` file (issue 13: reference-backed pivot).

PyTorch DCP's FileSystemWriter stores each tensor chunk as `torch.save(tensor)` bytes at a known
offset of a `.distcp` file (the `.metadata` storage index: relative path, offset, length); it clones a
view whose storage is larger than the chunk, so the blob holds one storage, exactly the chunk's bytes.
That storage is an uncompressed zip entry of the blob: its data starts at blob offset + entry data offset.
"""
from __future__ import annotations

import os

from ckptctl.formats.legacy.offsets import stored_records


class BlobLocator:
    """tensor -> (file, offset of its storage's first byte) for the tensor loaded from one blob."""

    def __init__(self, path, base: int, length: int):
        self.real, self.base, self.length = os.path.realpath(path), base, length
        self._data: tuple[int, int] | None | bool = False

    def __call__(self, tensor) -> tuple[str, int] | None:
        if self._data is False:
            recs = [v for k, v in stored_records(self.real, self.base, self.length).items() if "/data/" in k]
            self._data = recs[0] if len(recs) == 1 else None   # several storages: which is which is unknown
        if self._data is None or tensor.untyped_storage().nbytes() != self._data[1]:
            return None
        return self.real, self._data[0]
