"""The format contract (tests/formats/contract.py) for Megatron-LM's legacy `torch` format; the raw helpers
read and write rank files with torch.load / torch.save only."""
from __future__ import annotations

from pathlib import Path

import torch

from tests.conftest import load, raw_bytes
from tests.formats.contract import FormatContract


def _tensors(obj, path: str, out: dict) -> None:
    if torch.is_tensor(obj):
        out[path] = raw_bytes(obj.reshape(-1))
    elif isinstance(obj, dict):
        for k, v in obj.items():
            _tensors(v, f"{path}/{k}", out)
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            _tensors(v, f"{path}/{i}", out)


class TestLegacyFormat(FormatContract):
    fmt = "legacy"

    def raw_tensors(self, root: Path) -> dict[str, bytes]:
        out: dict[str, bytes] = {}
        for f in sorted(Path(root).rglob("*.pt")):
            sd = load(f)
            sd.pop("rng_state", None)           # per-rank RNG streams are not resharded
            _tensors(sd, str(f.relative_to(root)), out)
        return out

    def data_files(self, root: Path) -> list[Path]:
        return sorted(Path(root).rglob("model_optim_rng.pt"))

    def add_unknown_key(self, root: Path) -> str:
        f = self.data_files(root)[0]
        sd = load(f)
        sd["model"]["decoder.layers.0.mystery.weight"] = torch.zeros(4)
        torch.save(sd, f)
        return "decoder.layers.0.mystery.weight"

    def flip_byte(self, root: Path) -> str:
        f = self.data_files(root)[0]
        sd = load(f)
        sd["model"]["embedding.word_embeddings.weight"].view(torch.uint8).view(-1)[5] ^= 1
        torch.save(sd, f)
        return "embedding.word_embeddings.weight"
