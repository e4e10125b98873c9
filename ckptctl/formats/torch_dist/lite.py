"""`inspect` of a torch_dist checkpoint without torch (issue 13 item 5): detection, with the same answer as
`metadata.is_torch_dist` (a module that imports torch)."""
from __future__ import annotations

import json
from pathlib import Path

from ckptctl.formats.megatron import TRACKER, iter_dirname
from ckptctl.storage.lite_pickle import NotLite

BACKEND = "torch_dist"      # as metadata.BACKEND, metadata.CONFIG
CONFIG = "metadata.json"


def _iter_dir(root: Path) -> tuple[int | str, Path] | None:
    """As `metadata._iter_dir`."""
    root = Path(root)
    if (root / CONFIG).is_file():
        return "release", root
    tracker = root / TRACKER
    if tracker.is_file():
        text = tracker.read_text().strip()
        it = "release" if text == "release" else int(text) if text.isdigit() else None
        if it is not None and (root / iter_dirname(it) / CONFIG).is_file():
            return it, root / iter_dirname(it)
    return None


def detect(root: Path) -> bool:
    found = _iter_dir(root)
    if found is None:
        return False
    try:
        return json.loads((found[1] / CONFIG).read_text()).get("sharded_backend") == BACKEND
    except (OSError, ValueError):
        return False


def inspect(src: Path, true_vocab: int | None = None, family: str | None = None):
    raise NotLite("no torch-free inspect of torch_dist yet")


def optim_form(info: dict, sharding=None) -> str:
    raise NotLite("no torch-free inspect of torch_dist yet")
