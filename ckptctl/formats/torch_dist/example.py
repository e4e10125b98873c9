"""Stage-1 home of `ckptctl example --format torch_dist` (the legacy example converted); replaced by the
generic example command."""
from __future__ import annotations

from pathlib import Path

from ckptctl.errors import BadInput
from ckptctl.formats.megatron import iter_dirname
from ckptctl.formats.torch_dist.metadata import BACKEND, _iter_dir
from ckptctl.layout import Layout

# --- `ckptctl example --format torch_dist` ------------------------------------------------------

def example(family: str, layout: Layout, out: Path, opts: dict | None = None, seed: int = 1234,
            overwrite: bool = False, **kw) -> dict:
    """The legacy example of the same model and layout, converted to torch_dist in this process."""
    import inspect as pyinspect
    import shutil
    import uuid

    from ckptctl.convert import convert
    from ckptctl.example import example as legacy_example

    out = Path(out)
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise BadInput(f"destination {out} exists and is not empty (use --overwrite)")
    if "optimizer" in pyinspect.signature(legacy_example).parameters:
        kw["optimizer"] = kw.get("optimizer") or "none"      # distributed: written (torch_dist_optim)
    else:
        kw.pop("optimizer", None)
    optim_sharding = kw.pop("optim_sharding", None)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.legacy-{uuid.uuid4().hex[:8]}")
    try:
        res = legacy_example(family, layout, tmp, opts, seed=seed, **kw)
        rep = convert(tmp, out, layout, nproc=0, overwrite=overwrite, to_format=BACKEND, optim_sharding=optim_sharding)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    files = len(list((out / iter_dirname(rep_iteration(out))).glob("*.distcp")))
    return {**res, "out": str(out), "format": BACKEND, "files": files, "notes": rep.notes}


def rep_iteration(root: Path):
    found = _iter_dir(root)
    return found[0] if found else "release"
