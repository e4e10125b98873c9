"""Torch-free detection of a Hugging Face folder for `inspect`'s fast path (issue 13 item 5): the same
answer as `files.is_hf` (a module that imports torch). There is no torch-free inspect of it: `inspect`
goes the torch path when this says yes."""
from __future__ import annotations

from pathlib import Path

# as hf/files.py names them
INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"
CONFIG = "config.json"


def detect(path: Path) -> bool:
    path = Path(path)
    return path.is_dir() and (path / CONFIG).is_file() and ((path / INDEX).is_file() or (path / SINGLE).is_file())


def inspect(path: Path, true_vocab=None, family=None):
    from ckptctl.storage.lite_pickle import NotLite
    raise NotLite("no torch-free inspect of a Hugging Face folder")
