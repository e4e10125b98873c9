"""The format contract (tests/formats/contract.py) for megatron-core's `torch_dist` format; the raw helpers
read `.metadata` with PyTorch DCP's own classes and blobs with torch.load, never ckptctl's reader."""
from __future__ import annotations

import dataclasses
import io
import pickle
from pathlib import Path

import torch

from tests.conftest import raw_bytes
from tests.formats.contract import FormatContract


def _iter_dir(root: Path) -> Path:
    return next(p.parent for p in Path(root).rglob(".metadata"))


def _metadata(root: Path):
    import torch.distributed.checkpoint.metadata  # noqa: F401 - the classes the pickle names
    with open(_iter_dir(root) / ".metadata", "rb") as f:
        return pickle.load(f)


class TestTorchDistFormat(FormatContract):
    fmt = "torch_dist"

    def _entries(self, root: Path):
        md = _metadata(root)
        return md, [(idx, info) for idx, info in md.storage_data.items() if idx.offset is not None]

    def _blob(self, root: Path, info) -> bytes:
        with open(_iter_dir(root) / info.relative_path, "rb") as f:
            f.seek(info.offset)
            return f.read(info.length)

    def raw_tensors(self, root: Path) -> dict[str, bytes]:
        _, entries = self._entries(root)
        out = {}
        for idx, info in entries:
            t = torch.load(io.BytesIO(self._blob(root, info)), weights_only=True)
            out[f"{idx.fqn}@{list(idx.offset)}"] = raw_bytes(t.reshape(-1))
        return out

    def data_files(self, root: Path) -> list[Path]:
        return sorted(_iter_dir(root).glob("*.distcp"))

    def add_unknown_key(self, root: Path) -> str:
        md = _metadata(root)
        old, new = "embedding.word_embeddings.weight", "embedding.mystery.weight"
        md.state_dict_metadata[new] = md.state_dict_metadata.pop(old)
        md.storage_data = {(dataclasses.replace(k, fqn=new) if k.fqn == old else k): v for k, v in md.storage_data.items()}
        with open(_iter_dir(root) / ".metadata", "wb") as f:
            pickle.dump(md, f)
        return new

    def flip_byte(self, root: Path) -> str:
        key = "embedding.word_embeddings.weight"
        _, entries = self._entries(root)
        idx, info = next((i, s) for i, s in entries if i.fqn == key)
        t = torch.load(io.BytesIO(self._blob(root, info)), weights_only=True).clone()
        t.view(torch.uint8).view(-1)[5] ^= 1
        buf = io.BytesIO()
        torch.save(t, buf)
        assert len(buf.getvalue()) == info.length
        with open(_iter_dir(root) / info.relative_path, "r+b") as f:
            f.seek(info.offset)
            f.write(buf.getvalue())
        return key
