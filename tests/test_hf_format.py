"""The format contract (tests/formats/contract.py) for Hugging Face folders. An HF folder has no parallel
layout, so the round trip is HF (A) -> Megatron legacy at tp1pp2 (B) -> HF (back); the raw helpers parse
and damage safetensors files by the published spec (8-byte header length, JSON header, byte buffer),
without ckptctl or the safetensors library."""
from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest

from tests.conftest import run_cli
from tests.formats.contract import TINY, FormatContract

pytest.importorskip("safetensors")

LLAMA = ["--swiglu", "--norm", "RMSNorm", "--position", "rope", "--no-bias", "--groups", "2"]


def _header(f: Path) -> tuple[int, dict]:
    data = f.read_bytes()
    n = struct.unpack("<Q", data[:8])[0]
    return 8 + n, json.loads(data[8:8 + n])


class TestHFFormat(FormatContract):
    fmt = "hf"

    @pytest.fixture(scope="class")
    def ckpts(self, tmp_path_factory) -> dict[str, Path]:
        d = tmp_path_factory.mktemp("contract-hf")
        a, b, back = d / "a", d / "b", d / "back"
        r = run_cli("example", "gpt", "--layout", "tp2pp1", *TINY, *LLAMA, "--format", "hf", "--out", a, "--json")
        assert r.code == 0, r.out + r.err
        for args in ((a, b, "--to", self.layout_b), (b, back, "--to-format", "hf")):
            r = run_cli("convert", *args, "--nproc", "0", "--json")
            assert r.code == 0, r.out + r.err
        return {"a": a, "b": b, "back": back}

    def data_files(self, root: Path) -> list[Path]:
        return sorted(Path(root).glob("*.safetensors"))

    def raw_tensors(self, root: Path) -> dict[str, bytes]:
        out = {}
        for f in self.data_files(root):
            start, head = _header(f)
            data = f.read_bytes()
            for k, v in head.items():
                if k != "__metadata__":
                    a, b = v["data_offsets"]
                    out[k] = data[start + a:start + b]
        return out

    def add_unknown_key(self, root: Path) -> str:
        """Rewrite the first shard with one more tensor (header and buffer by the spec)."""
        name = "model.layers.0.mlp.extra_proj.weight"
        f = self.data_files(root)[0]
        start, head = _header(f)
        data = f.read_bytes()
        end = max(v["data_offsets"][1] for k, v in head.items() if k != "__metadata__")
        head[name] = {"dtype": "F32", "shape": [2], "data_offsets": [end, end + 8]}
        h = json.dumps(head).encode()
        h += b" " * (-len(h) % 8)
        f.write_bytes(struct.pack("<Q", len(h)) + h + data[start:start + end] + b"\0" * 8)
        idx = Path(root) / "model.safetensors.index.json"
        if idx.exists():
            doc = json.loads(idx.read_text())
            doc["weight_map"][name] = f.name
            idx.write_text(json.dumps(doc))
        return name

    def flip_byte(self, root: Path) -> str:
        key = "model.layers.1.self_attn.o_proj.weight"
        for f in self.data_files(root):
            start, head = _header(f)
            if key in head:
                data = bytearray(f.read_bytes())
                data[start + head[key]["data_offsets"][0] + 4] ^= 1
                f.write_bytes(bytes(data))
                return "decoder.layers.1.self_attention.linear_proj.weight"
        raise AssertionError(f"{key} in no shard")

    def test_registered_and_detected(self, ckpts):
        from ckptctl.formats import registry
        fmt = registry.get(self.fmt)
        assert fmt.name == "hf" and registry.get("huggingface") is fmt
        assert registry.detect(ckpts["a"]) is fmt and registry.detect(ckpts["back"]) is fmt
        assert registry.detect(ckpts["b"]).name == "legacy"        # B is the Megatron side of the round trip
