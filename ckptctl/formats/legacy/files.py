"""Megatron-LM's legacy `torch` checkpoint format: finding and inventorying rank files, reading them as units.

    <root>/latest_checkpointed_iteration.txt        iteration number or "release"
    <root>/iter_0000010/mp_rank_TT[_PPP][_EEE]/model_optim_rng.pt

Files are untrusted pickles: every load goes through `ckptctl.storage.pickles` (weights_only, allow-list).
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from ckptctl.errors import BadInput
from ckptctl.paths import require_checkpoint
from ckptctl.formats.megatron import TOP_LEVEL_POLICY, TRACKER, args_dict, iter_dirname, layout_from_args
from ckptctl.layout import FileCoord, Layout

MODEL_FILE = "model_optim_rng.pt"
OPTIM_FILE = "distrib_optim.pt"
_DIR = re.compile(r"^mp_rank_(\d{2})(?:_(\d{3}))?(?:_(\d{3}))?$")
_CHUNK = re.compile(r"^model(\d*)$")


@dataclass
class LegacyCheckpoint:
    root: Path
    iteration: int | str           # "release" or an int
    iter_dir: Path
    layout: Layout
    args: dict
    files: dict[FileCoord, Path] = field(default_factory=dict)   # coord -> model_optim_rng.pt

    @property
    def file_list(self) -> list[tuple[FileCoord, Path]]:
        return sorted(self.files.items(), key=lambda kv: (kv[0].pp, kv[0].ep, kv[0].tp))


def is_legacy(root: Path) -> bool:
    root = Path(root)
    return (root / TRACKER).is_file() or any(root.glob("mp_rank_*")) or any(root.glob("iter_*/mp_rank_*"))


def open_legacy(root: Path, load=None) -> LegacyCheckpoint:
    """Find the checkpoint's files and check them against the layout its args declare. No tensor is read.
    `load`: path -> the rank file's dict (default `load_pt`; inspect's torch-free reader passes its own)."""
    if load is None:
        from ckptctl.storage.pickles import load_pt as load   # torch: imported where a file is loaded
    root = Path(root)
    require_checkpoint(root)
    tracker = root / TRACKER
    if tracker.is_file():
        text = tracker.read_text().strip()
        if text == "release":
            iteration, iter_dir = "release", root / "release"
        elif text.isdigit():
            iteration, iter_dir = int(text), root / iter_dirname(int(text))
        else:
            raise BadInput(f"{tracker}: expected an iteration number or 'release', got {text[:40]!r}")
    elif any(root.glob("mp_rank_*")):
        iteration, iter_dir = "release", root
    else:
        raise BadInput(f"{root}: not a Megatron legacy checkpoint (no {TRACKER})")
    if not iter_dir.is_dir():
        raise BadInput(f"{tracker} names {iter_dir.name}, which does not exist")
    found: dict[tuple, Path] = {}
    for d in sorted(iter_dir.iterdir()):
        m = _DIR.match(d.name)
        if d.is_dir() and m:
            found[tuple(int(g) if g is not None else None for g in m.groups())] = d
        elif d.is_dir() and d.name.startswith("mp_rank_"):
            raise BadInput(f"{d}: unrecognised rank directory name")
    if not found:
        raise BadInput(f"{iter_dir}: no mp_rank_* directories")
    first = found[min(found, key=lambda k: tuple(x or 0 for x in k))] / MODEL_FILE
    sd = load(first)
    if "args" not in sd:
        raise BadInput(f"{first}: no 'args' entry; cannot tell the model or layout")
    if isinstance(sd.get("checkpoint_version"), (int, float)) and sd["checkpoint_version"] < 3:
        raise BadInput(f"{first}: checkpoint_version {sd['checkpoint_version']} < 3.0 (pre-mcore QKV order) is not supported")
    args = args_dict(sd["args"])
    layout = layout_from_args(args)
    files: dict[FileCoord, Path] = {}
    expected = {}
    for fc in layout.model_files:
        expected[fc.dirname(layout)] = fc
    names = {d.name for d in found.values()}
    for name, fc in expected.items():
        if name not in names:
            raise BadInput(f"missing rank file {iter_dir / name / MODEL_FILE} (layout {layout} from args)")
        path = iter_dir / name / MODEL_FILE
        if not path.is_file():
            raise BadInput(f"missing rank file {path}")
        files[fc] = path
    extra = sorted(names - set(expected))
    if extra:
        raise BadInput(f"{iter_dir / extra[0]}: rank directory not part of layout {layout} declared in args")
    return LegacyCheckpoint(root=root, iteration=iteration, iter_dir=iter_dir, layout=layout, args=args, files=files)


def chunk_names(sd: dict, path: Path) -> list[str]:
    """`model` or `model0..N` (virtual pipeline), in chunk order."""
    names = [k for k in sd if isinstance(k, str) and _CHUNK.match(k)]
    if not names:
        raise BadInput(f"{path}: no 'model' entry")
    if "model" in names and len(names) > 1:
        raise BadInput(f"{path}: has both 'model' and 'model0..'")
    return sorted(names, key=lambda n: int(n[5:] or 0))


def chunk_key(layout: Layout, v: int) -> str:
    return f"model{v}" if layout.vpp > 1 else "model"


def top_level_keys(sd: dict, path: Path) -> dict[str, str]:
    """Policy for each non-model key of a rank file; an unknown key is refused, never dropped."""
    out = {}
    for k in sd:
        if isinstance(k, str) and _CHUNK.match(k):
            continue
        if k not in TOP_LEVEL_POLICY:
            raise BadInput(f"{path}: unknown top-level key {k!r} (no policy carries it)")
        out[k] = TOP_LEVEL_POLICY[k]
    return out


def _torch_tensor(v) -> tuple | None:
    """(shape, dtype name) of a torch tensor, None for anything else."""
    import torch
    return (tuple(v.shape), str(v.dtype).removeprefix("torch.")) if torch.is_tensor(v) else None


def inventory(sd: dict, path: Path, tensor=_torch_tensor) -> dict[str, list]:
    """Per chunk: (key, shape, dtype) for tensors, (key, None, None) for `_extra_state` objects. `tensor(v)`:
    (shape, dtype name) of a tensor, None for anything else (the torch-free reader passes its own)."""
    out = {}
    for chunk in chunk_names(sd, path):
        entries = []
        for k, v in sd[chunk].items():
            if (t := tensor(v)) is not None:
                entries.append((k, *t))
            elif k.endswith("_extra_state"):
                entries.append((k, None, None))
            else:
                raise BadInput(f"{path}: {chunk}[{k!r}] is a {type(v).__name__}, not a tensor")
        out[chunk] = entries
    return out


class LegacyUnit:
    """One rank file opened for the source phase and verify's gather (the reader interface of a format)."""

    def __init__(self, sd: dict, dirname: str, path: Path | None = None):
        self.sd, self.dirname = sd, dirname
        self._locate = None
        if path is not None:   # memory-mapped: tensors can be located in the file (the reference pivot)
            from ckptctl.formats.legacy.offsets import RankFileLocator
            self._locate = RankFileLocator(path)

    def locate(self, tensor) -> tuple[str, int] | None:
        """(file, offset of the tensor's storage's first byte) when the file holds it as raw bytes."""
        return self._locate(tensor) if self._locate is not None else None

    def tensor(self, t):
        return self.sd[t.chunk][t.key]

    def object(self, o):
        return self.sd[o.chunk][o.key]

    def rng(self) -> dict:
        return {"rng@" + self.dirname: self.sd.get("rng_state")}

    def common(self) -> dict:
        return {k: v for k, v in self.sd.items() if TOP_LEVEL_POLICY.get(k) in ("copy", "rewrite")}

    def dropped(self) -> list[str]:
        return sorted(k for k in self.sd if TOP_LEVEL_POLICY.get(k) == "optimizer")


def inventories_from_json(invs: list[dict]) -> list:
    """The planner's `Inventory` of each rank file from inspect's JSON-able form (as jobs carry it)."""
    from ckptctl.reshard.plan import Inventory
    return [Inventory.from_json(i) for i in invs]
