"""The format registry: finds the format packages under `ckptctl/formats/` (each exposes `FORMAT`, a
`ckptctl.formats.base.Format`), resolves names and aliases, and detects a checkpoint's format. Generic
code asks here and never names a format; a new format is a new package, found without a line here.

Packages are imported on first use (as zarr's codec registry loads its plug-ins), so registration points
one way: formats never import the registry's callers.
"""
from __future__ import annotations

import importlib
import pkgutil
from pathlib import Path

from ckptctl.errors import BadInput

_found: dict[str, object] | None = None


def _load() -> dict[str, object]:
    global _found
    if _found is None:
        import ckptctl.formats as pkg
        found = {}
        for m in pkgutil.iter_modules(pkg.__path__):
            if not m.ispkg:
                continue
            fmt = getattr(importlib.import_module(f"{pkg.__name__}.{m.name}"), "FORMAT", None)
            if fmt is None:
                continue
            for n in (fmt.name, *fmt.aliases):
                if n in found and found[n] is not fmt:   # one name, two formats: refuse, never pick one
                    raise RuntimeError(f"format name {n!r} registered twice ({found[n].name}, {fmt.name})")
                found[n] = fmt
        _found = found
    return _found


def formats() -> list:
    """Every registered format, once, in detection order."""
    seen = {id(f): f for f in _load().values()}
    return sorted(seen.values(), key=lambda f: (f.detect_order, f.name))


def names() -> list[str]:
    return [f.name for f in formats()]


def canonical(name: str | None) -> str | None:
    """A format name as ckptctl spells it (aliases such as Megatron's `torch` resolved); unknown names pass
    through for the caller to refuse naming the choices."""
    if name is None:
        return None
    key = name.strip().lower()
    f = _load().get(key)
    return f.name if f is not None else key


def get(name: str, option: str = "--format"):
    """The format called `name` (or an alias); BadInput naming the choices otherwise."""
    f = _load().get((name or "").strip().lower())
    if f is None:
        raise BadInput(f"{option}: expected one of {', '.join(names())}, got {name!r}")
    return f


def detect(path: Path):
    """The format of the checkpoint at `path`: the first that recognises it, else the fallback format
    (whose inspect names what is missing)."""
    fs = formats()
    for f in fs:
        if f.detect(Path(path)):
            return f
    return fallback()


def megatron_name(name: str) -> str:
    """Megatron-LM's --ckpt-format for a format name (unknown names pass through)."""
    f = _load().get(name)
    return f.megatron_name if f is not None else name


def example_writer():
    """The format `ckptctl example` writes directly; any other format is that example converted."""
    return next(f for f in formats() if f.writes_examples)


def fallback():
    """The format inspected when none detects a path; also the source format of stores that predate
    recording one."""
    return next(f for f in formats() if f.fallback)
