"""Command-line conventions the typer defaults miss: flags shown without a type tag (`--swiglu`, not
`--swiglu <bool>`), the version, the families and the layout parts a user wrote."""
from __future__ import annotations

import re

from typer.core import TyperOption

# A boolean flag takes no value: typer 0.2x prints `<bool>` after it, and `--swiglu true` then fails.
# Only typer releases that have the hook get the fix; others (older or newer) keep their own display,
# never a crash at import (the CLI must start with any typer the package accepts).
_orig_type = getattr(TyperOption, "display_type_rich", None)


def _flag_type(self, ctx):
    return None if getattr(self, "is_flag", False) else _orig_type(self, ctx)


if _orig_type is not None:
    TyperOption.display_type_rich = _flag_type


def version() -> str:
    """The installed distribution's version, else the package's."""
    try:
        from importlib.metadata import version as v
        return v("ckptctl")
    except Exception:  # noqa: BLE001 - not installed as a distribution (a source checkout on PYTHONPATH)
        from ckptctl import __version__
        return __version__


def families() -> str:
    from ckptctl.models import family_names
    return ", ".join(family_names())


def layout_parts(text: str) -> dict[str, int]:
    """The parts a layout string names explicitly, e.g. 'tp4pp1' -> {'tp': 4, 'pp': 1}."""
    return {m.group(1): int(m.group(2)) for m in re.finditer(r"(vpp|etp|tp|pp|ep|dp|cp)(\d+)", text.lower())}


def key_values(items, option: str) -> dict[str, str]:
    """Repeated KEY=VALUE options as a dict; a malformed one is refused naming the option."""
    out = {}
    for it in items or []:
        k, sep, v = it.partition("=")
        if not sep or not k.strip():
            from ckptctl.errors import BadInput
            raise BadInput(f"{option}: expected KEY=VALUE, got {it!r}")
        out[k.strip()] = v.strip()
    return out
