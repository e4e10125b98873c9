"""Hugging Face model folders: sharded safetensors (written and read with the `safetensors` library),
the index, and the JSON files beside them.

Sharding follows transformers' `save_pretrained`: tensors in model order, a new shard when the next
tensor would pass the shard size (a larger tensor gets a shard of its own); one shard is written as
`model.safetensors` without an index, several as `model-0000i-of-0000n.safetensors` with
`model.safetensors.index.json` (`metadata.total_size` = tensor bytes, `weight_map` name -> file).
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import torch

from ckptctl.errors import BadInput

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"
CONFIG = "config.json"
GENERATION = "generation_config.json"


def parse_size(text) -> int:
    """'5GB', '500MB', '2GiB', or an int of bytes (transformers' decimal/binary units)."""
    if isinstance(text, int):
        return text
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(I?)B?\s*", str(text).upper())
    if not m:
        raise BadInput(f"--shard-size: expected a size such as 5GB or 500MB, got {text!r}")
    base = 1024 if m[3] else 1000
    return int(float(m[1]) * base ** " KMGT".index(m[2] or " "))


def plan_shards(sizes: list[tuple[str, int]], max_bytes: int) -> list[list[str]]:
    """Names grouped into shards, in order (transformers' rule)."""
    shards, cur, n = [], [], 0
    for name, b in sizes:
        if cur and n + b > max_bytes:
            shards.append(cur)
            cur, n = [], 0
        cur.append(name)
        n += b
    if cur:
        shards.append(cur)
    return shards


def shard_names(count: int) -> list[str]:
    if count == 1:
        return [SINGLE]
    return [f"model-{i + 1:05d}-of-{count:05d}.safetensors" for i in range(count)]


ST_NAMES = {"float32": "F32", "bfloat16": "BF16", "float16": "F16"}


def write_shard(path: Path, specs: list[tuple[str, tuple, str]], produce) -> None:
    """One shard written to the safetensors spec, a tensor at a time (memory: one tensor, never the
    shard): `specs` (name, shape, torch dtype name) in file order, `produce(name)` -> the tensor. Then the
    file is opened with the safetensors library and every tensor's bytes checked against the crc32c taken
    while writing (the file is what any loader will see)."""
    import struct

    import google_crc32c
    from safetensors import safe_open
    header, at = {"__metadata__": {"format": "pt"}}, 0
    for name, shape, dtype in specs:
        n = getattr(torch, dtype).itemsize
        for d in shape:
            n *= d
        header[name] = {"dtype": ST_NAMES[dtype], "shape": list(shape), "data_offsets": [at, at + n]}
        at += n
    head = json.dumps(header, separators=(",", ":")).encode()
    head += b" " * (-len(head) % 8)          # the spec's alignment padding (spaces), as the library writes
    crcs = {}
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(head)))
        f.write(head)
        for name, shape, dtype in specs:
            t = produce(name)
            if tuple(t.shape) != tuple(shape) or t.dtype != getattr(torch, dtype):
                raise RuntimeError(f"{path}: tensor {name} is {t.dtype} {tuple(t.shape)}, planned {dtype} {shape}")
            b = t.contiguous().reshape(-1).view(torch.uint8).numpy()
            crcs[name] = google_crc32c.value(b)
            f.write(b)
            del t, b
    with safe_open(str(path), framework="pt") as f:
        if sorted(f.keys()) != sorted(crcs):
            raise RuntimeError(f"{path}: the safetensors library reads other keys than were written")
        for name, shape, dtype in specs:
            back = f.get_tensor(name)
            if (back.dtype != getattr(torch, dtype) or tuple(back.shape) != tuple(shape)
                    or google_crc32c.value(back.contiguous().reshape(-1).view(torch.uint8).numpy()) != crcs[name]):
                raise RuntimeError(f"{path}: tensor {name} reads back different from what was written")


def write_index(folder: Path, weight_map: dict[str, str], total: int) -> None:
    doc = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (folder / INDEX).write_text(json.dumps(doc, indent=2) + "\n")


def write_json(path: Path, doc: dict) -> None:
    path.write_text(json.dumps(doc, indent=2, sort_keys=True) + "\n")


def is_hf(path: Path) -> bool:
    path = Path(path)
    return path.is_dir() and (path / CONFIG).is_file() and ((path / INDEX).is_file() or (path / SINGLE).is_file())


class HFFolder:
    """A Hugging Face model folder, read lazily: tensors come from their shard on request."""

    def __init__(self, path: Path):
        self.path = Path(path)
        if not (self.path / CONFIG).is_file():
            raise BadInput(f"{self.path}: no config.json (not a Hugging Face model folder)")
        try:
            self.config = json.loads((self.path / CONFIG).read_text())
        except json.JSONDecodeError as e:
            raise BadInput(f"{self.path / CONFIG}: not valid JSON ({e})") from None
        if (self.path / INDEX).is_file():
            try:
                wm = json.loads((self.path / INDEX).read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise BadInput(f"{self.path / INDEX}: not a safetensors index ({e})") from None
            self.weight_map = dict(wm)
        elif (self.path / SINGLE).is_file():
            self.weight_map = {k: SINGLE for k in self._keys(SINGLE)}
        else:
            raise BadInput(f"{self.path}: no {SINGLE} and no {INDEX}")
        self._meta: dict[str, tuple] = {}
        for fname in sorted(set(self.weight_map.values())):
            for k, (dtype, shape) in self._header(fname).items():
                if self.weight_map.get(k) == fname:
                    self._meta[k] = (dtype, shape)
        missing = [k for k, f in self.weight_map.items() if k not in self._meta]
        if missing:
            raise BadInput(f"{self.path}: tensor {missing[0]!r} is listed in the index but not in {self.weight_map[missing[0]]}")

    def _file(self, fname: str) -> Path:
        p = self.path / fname
        if not p.is_file() or p.resolve().parent != self.path.resolve():
            raise BadInput(f"{self.path}: shard {fname} is missing (or outside the folder)")
        return p

    def _keys(self, fname: str) -> list[str]:
        return list(self._header(fname))

    def _header(self, fname: str) -> dict[str, tuple[str, tuple]]:
        """name -> (safetensors dtype, shape), from the file's JSON header (no tensor bytes read)."""
        import struct
        p = self._file(fname)
        size = p.stat().st_size
        with open(p, "rb") as f:
            head = f.read(8)
            n = struct.unpack("<Q", head)[0] if len(head) == 8 else -1
            if n < 2 or 8 + n > size:
                raise BadInput(f"{p}: not a safetensors file (bad header length)")
            try:
                doc = json.loads(f.read(n))
            except (json.JSONDecodeError, UnicodeDecodeError):
                raise BadInput(f"{p}: not a safetensors file (bad header)") from None
        end = 0
        out = {}
        for k, v in doc.items() if isinstance(doc, dict) else ():
            if k == "__metadata__":
                continue
            try:
                out[k] = (str(v["dtype"]), tuple(int(x) for x in v["shape"]))
                end = max(end, int(v["data_offsets"][1]))
            except (KeyError, TypeError, ValueError, IndexError):
                raise BadInput(f"{p}: not a safetensors file (bad header entry for {k!r})") from None
        if 8 + n + end > size:
            raise BadInput(f"{p}: truncated ({size} bytes, its header describes {8 + n + end})")
        return out

    def keys(self) -> list[str]:
        return list(self.weight_map)

    def shape(self, name: str) -> tuple:
        return self._meta[name][1]

    def get(self, name: str) -> torch.Tensor:
        from safetensors import SafetensorError, safe_open
        if name not in self.weight_map:
            raise BadInput(f"{self.path}: no tensor {name!r}")
        p = self._file(self.weight_map[name])
        try:
            with safe_open(str(p), framework="pt") as f:
                return f.get_tensor(name)
        except SafetensorError as e:
            raise BadInput(f"{p}: tensor {name}: {e}") from None
