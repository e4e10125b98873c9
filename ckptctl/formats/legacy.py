"""Megatron-LM's legacy `torch` checkpoint format: finding, loading and writing rank files.

    <root>/latest_checkpointed_iteration.txt        iteration number or "release"
    <root>/iter_0000010/mp_rank_TT[_PPP][_EEE]/model_optim_rng.pt

Files are untrusted pickles: every load is `weights_only=True` with an explicit allow-list.
"""
from __future__ import annotations

import argparse
import io
import pickle
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ckptctl.errors import BadInput
from ckptctl.layout import FileCoord, Layout

TRACKER = "latest_checkpointed_iteration.txt"
MODEL_FILE = "model_optim_rng.pt"
OPTIM_FILE = "distrib_optim.pt"
_DIR = re.compile(r"^mp_rank_(\d{2})(?:_(\d{3}))?(?:_(\d{3}))?$")
_CHUNK = re.compile(r"^model(\d*)$")

# Globals a Megatron checkpoint may name besides torch's own: args is a Namespace; TE extra state may
# be a BytesIO. Megatron's enums in args get a stand-in that writes itself back under the same name.
SAFE_GLOBALS: list = [argparse.Namespace, io.BytesIO]
# Megatron-LM's RNG state holds numpy's RandomState state: an ndarray of uint32.
SAFE_GLOBALS += [np._core.multiarray._reconstruct, (np._core.multiarray._reconstruct, "numpy.core.multiarray._reconstruct"),
                 np.ndarray, np.dtype] + [getattr(np.dtypes, n) for n in dir(np.dtypes) if n.endswith("DType")]
FOREIGN_PREFIXES = ("megatron.",)


class ForeignObject:
    """An object of a class we do not import (a Megatron enum in args), kept by name and arguments."""

    qualname = ""

    def __init__(self, *args):
        self.args = args

    def __repr__(self):
        return f"{self.qualname}{self.args!r}"

    def __eq__(self, other):
        return type(other) is type(self) and other.args == self.args

    def __hash__(self):
        return hash((self.qualname, self.args))


_foreign: dict[str, type] = {}


def _stand_in(qualname: str) -> type:
    if qualname not in _foreign:
        _foreign[qualname] = type(qualname.rsplit(".", 1)[1], (ForeignObject,), {"qualname": qualname})
    return _foreign[qualname]


class _Pickler(pickle._Pickler):
    """Writes stand-ins back as the global they were read from, so Megatron sees its own enum."""

    def reducer_override(self, obj):
        if isinstance(obj, ForeignObject):
            return (_GlobalRef(obj.qualname), obj.args)
        return NotImplemented

    def save_global(self, obj, name=None):
        if isinstance(obj, _GlobalRef):
            mod, _, nm = obj.qualname.rpartition(".")
            self.write(pickle.GLOBAL + f"{mod}\n{nm}\n".encode())
            self.memoize(obj)
            return
        super().save_global(obj, name)


class _GlobalRef:
    def __init__(self, qualname):
        self.qualname = qualname

    def __call__(self, *args):  # pickle requires reduce functions to be callable
        return _stand_in(self.qualname)(*args)


class _PickleModule:
    Pickler = _Pickler
    Unpickler = pickle.Unpickler
    load = pickle.load
    dump = pickle.dump


def _with_stand_ins(obj) -> bool:
    if isinstance(obj, ForeignObject):
        return True
    if isinstance(obj, argparse.Namespace):
        obj = vars(obj)
    if isinstance(obj, dict):
        return any(_with_stand_ins(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return any(_with_stand_ins(v) for v in obj)
    return False


def _dispatch_global(self, obj, name=None):  # pure-python pickler hook for _GlobalRef
    return _Pickler.save_global(self, obj, name)


_Pickler.dispatch = dict(pickle._Pickler.dispatch)
_Pickler.dispatch[_GlobalRef] = _dispatch_global


def save_pt(obj, path: Path) -> None:
    """torch.save, routing through our pickler only when Megatron stand-ins must be written back."""
    if _with_stand_ins(obj):
        torch.save(obj, path, pickle_module=_PickleModule)
    else:
        torch.save(obj, path)


def load_pt(path: Path, mmap: bool = True):
    """Load one rank file safely. Missing, truncated or unexpected content is a BadInput naming the file."""
    path = Path(path)
    if not path.is_file():
        raise BadInput(f"missing rank file {path}")
    try:
        return _weights_only_load(path, str(path), mmap)
    except (RuntimeError, EOFError, OSError, ValueError) as e:
        raise BadInput(f"{path}: truncated or corrupt rank file ({str(e).splitlines()[0][:120]})") from None


def _weights_only_load(src, what: str, mmap: bool = False):
    """torch.load(weights_only=True) with our allow-list; Megatron's own classes get stand-ins as met."""
    extra = [(_stand_in(q), q) for q in _foreign]
    for _ in range(16):
        if isinstance(src, io.BytesIO):
            src.seek(0)
        try:
            with torch.serialization.safe_globals(SAFE_GLOBALS + extra):
                return torch.load(src, map_location="cpu", weights_only=True, mmap=mmap)
        except pickle.UnpicklingError as e:
            m = re.search(r"Unsupported global: GLOBAL ([\w.]+)", str(e))
            if m and m.group(1).startswith(FOREIGN_PREFIXES) and all(q != m.group(1) for _, q in extra):
                extra.append((_stand_in(m.group(1)), m.group(1)))
                continue
            # name what was refused, never torch's advice to load with weights_only=False
            g = m or re.search(r"GLOBAL ([\w.]+)", str(e))
            why = re.search(r"WeightsUnpickler error: (.*)", str(e))
            name = g.group(1) if g else (why.group(1).strip() if why else str(e).strip().splitlines()[-1])[:160]
            raise BadInput(f"{what}: refusing to unpickle {name} (not on the allow-list)") from None
    raise BadInput(f"{what}: too many unknown globals")


def args_dict(args) -> dict:
    if isinstance(args, argparse.Namespace):
        return dict(vars(args))
    if isinstance(args, dict):
        return dict(args)
    raise BadInput(f"checkpoint 'args' is a {type(args).__name__}, expected an argparse.Namespace")


def layout_from_args(args: dict) -> Layout:
    etp = args.get("expert_tensor_parallel_size")
    tp = int(args.get("tensor_model_parallel_size") or 1)
    return Layout(
        tp=tp,
        pp=int(args.get("pipeline_model_parallel_size") or 1),
        vpp=int(args.get("virtual_pipeline_model_parallel_size") or 1),
        ep=int(args.get("expert_model_parallel_size") or 1),
        etp=None if etp is None or int(etp) == tp else int(etp),
        dp=int(args.get("data_parallel_size") or 1),
        cp=int(args.get("context_parallel_size") or 1),
    )


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


def iter_dirname(iteration) -> str:
    return "release" if iteration == "release" else f"iter_{int(iteration):07d}"


def is_legacy(root: Path) -> bool:
    root = Path(root)
    return (root / TRACKER).is_file() or any(root.glob("mp_rank_*")) or any(root.glob("iter_*/mp_rank_*"))


def open_legacy(root: Path) -> LegacyCheckpoint:
    """Find the checkpoint's files and check them against the layout its args declare. No tensor is read."""
    root = Path(root)
    if not root.exists():
        raise BadInput(f"no checkpoint at {root}")
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
    sd = load_pt(first)
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


def write_tracker(root: Path, iteration) -> None:
    (root / TRACKER).write_text("release" if iteration == "release" else str(int(iteration)))


# --- what a rank file holds besides the model, and what happens to it (DESIGN §3) ----------------

# key -> policy. "reshard": the model chunks; "rewrite": args; "copy": taken from source rank 0;
# "rng": per-rank RNG states (--rng); "optimizer": optimizer state (see ckptctl.optim).
TOP_LEVEL_POLICY = {
    "args": "rewrite",
    "checkpoint_version": "copy",
    "iteration": "copy",
    "opt_param_scheduler": "copy",
    "num_floating_point_operations_so_far": "copy",
    "rerun_state_machine": "copy",
    "rng_state": "rng",
    "optimizer": "optimizer",
}


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


def inventory(sd: dict, path: Path) -> dict[str, list]:
    """Per chunk: (key, shape, dtype) for tensors, (key, None, None) for `_extra_state` objects."""
    out = {}
    for chunk in chunk_names(sd, path):
        entries = []
        for k, v in sd[chunk].items():
            if torch.is_tensor(v):
                entries.append((k, tuple(v.shape), str(v.dtype).removeprefix("torch.")))
            elif k.endswith("_extra_state"):
                entries.append((k, None, None))
            else:
                raise BadInput(f"{path}: {chunk}[{k!r}] is a {type(v).__name__}, not a tensor")
        out[chunk] = entries
    return out


def rewrite_args(args: dict, layout: Layout, padded_vocab: int | None, num_layers: int) -> dict:
    """The args a Megatron run at `layout` would have saved: parallel sizes and padded vocab."""
    a = dict(args)
    a["tensor_model_parallel_size"] = layout.tp
    a["pipeline_model_parallel_size"] = layout.pp
    a["virtual_pipeline_model_parallel_size"] = layout.vpp if layout.vpp > 1 else None
    if "num_layers_per_virtual_pipeline_stage" in a or layout.vpp > 1:
        a["num_layers_per_virtual_pipeline_stage"] = (num_layers // (layout.pp * layout.vpp)) if layout.vpp > 1 else None
    a["expert_model_parallel_size"] = layout.ep
    if "expert_tensor_parallel_size" in a or layout.etp is not None:
        a["expert_tensor_parallel_size"] = layout.expert_tp
    a["context_parallel_size"] = layout.cp
    a["data_parallel_size"] = layout.dp
    a["world_size"] = layout.world
    if padded_vocab is not None:
        a["padded_vocab_size"] = padded_vocab
    if layout.tp == 1 and a.get("sequence_parallel"):
        a["sequence_parallel"] = False
    from ckptctl.pipeline import with_split_args
    return with_split_args(a, layout)      # the target's pipeline split, when it carries its own


def loads_bytes(data: bytes, what: str):
    """Unpickle an object we stored (args, RNG state ...) with the same allow-list as rank files."""
    try:
        return _weights_only_load(io.BytesIO(data), f"stored object {what}")
    except (RuntimeError, EOFError, OSError, ValueError) as e:
        raise BadInput(f"stored object {what}: cannot be read back ({str(e).splitlines()[0][:120]})") from None


def dumps_bytes(obj) -> bytes:
    buf = io.BytesIO()
    save_pt(obj, buf)
    return buf.getvalue()


class LegacyUnit:
    """One rank file opened for the source phase and verify's gather (the reader interface of a format)."""

    def __init__(self, sd: dict, dirname: str):
        self.sd, self.dirname = sd, dirname

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
