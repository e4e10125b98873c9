"""`ckptctl verify STORE.zarr CKPT`: a store side is first written out as the checkpoint it was made
from (its source layout and format, every chunk's crc32c checked on the way) into a hidden temporary
folder beside it, then verified like any checkpoint: the comparison itself never trusts the store."""
from __future__ import annotations

import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path


def is_store(p: Path) -> bool:
    return (Path(p) / "zarr.json").is_file()


@contextmanager
def materialized(p: Path):
    """`p` itself, or for a store the checkpoint written from it (removed afterwards)."""
    p = Path(p)
    if not is_store(p):
        yield p
        return
    from ckptctl.convert import convert
    from ckptctl.reshard.launch import default_nproc
    tmp = Path(tempfile.mkdtemp(prefix=f".{p.name}.verify-", dir=p.resolve().parent))
    try:
        convert(p, tmp / "ckpt", None, nproc=default_nproc())
        yield tmp / "ckpt"
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
