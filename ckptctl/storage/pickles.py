"""Safe (un)pickling of Megatron checkpoint objects: every load is `torch.load(weights_only=True)` with an
explicit allow-list; Megatron's own classes (enums in args) get stand-ins that write themselves back
under the same name. Used by every format and by the store's pickled objects (args, RNG, extra state)."""
from __future__ import annotations

import argparse
import io
import pickle
import re
from pathlib import Path

from ckptctl.errors import BadInput
# the allow-list lives below this module so the torch-free readers (lite_pickle) and the C-unpickler path
# (mapped_pickle), which this module calls, can share it without an import cycle
from ckptctl.storage.allow_list import FOREIGN_PREFIXES, ForeignObject, _foreign, _stand_in, safe_globals  # noqa: F401


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
    import torch   # here, not at the top: inspect's torch-free readers import modules that import this one
    if _with_stand_ins(obj):
        torch.save(obj, path, pickle_module=_PickleModule)
    else:
        torch.save(obj, path)


def load_pt(path: Path, mmap: bool = True):
    """Load one rank file safely. Missing, truncated or unexpected content is a BadInput naming the file."""
    path = Path(path)
    if not path.is_file():
        raise BadInput(f"missing rank file {path}")
    if mmap:
        # the same object through the C unpickler (~5x faster); what it cannot read goes to torch.load below
        from ckptctl.storage.mapped_pickle import NotLite, load
        try:
            return load(path)
        except NotLite:
            pass
    try:
        return _weights_only_load(path, str(path), mmap)
    except (RuntimeError, EOFError, OSError, ValueError) as e:
        raise BadInput(f"{path}: truncated or corrupt rank file ({str(e).splitlines()[0][:120]})") from None


def _weights_only_load(src, what: str, mmap: bool = False):
    """torch.load(weights_only=True) with our allow-list; Megatron's own classes get stand-ins as met."""
    import torch
    extra = [(_stand_in(q), q) for q in _foreign]
    for _ in range(16):
        if isinstance(src, io.BytesIO):
            src.seek(0)
        try:
            with torch.serialization.safe_globals(safe_globals() + extra):
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

