"""Shared test helpers: run the CLI in-process (exit code + output) and make example checkpoints."""
from __future__ import annotations

import io
import json
import sys
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

import pytest
import torch


class CliResult:
    def __init__(self, code: int, out: str, err: str):
        self.code, self.out, self.err = code, out, err

    def json(self):
        return json.loads(self.out)


def run_cli(*args) -> CliResult:
    """Run `ckptctl ARGS` in this process through the real entry point (exit-code mapping included)."""
    from ckptctl import cli, output
    from rich.console import Console

    out, err = io.StringIO(), io.StringIO()
    old = sys.argv
    sys.argv = ["ckptctl", *map(str, args)]
    output.out, output.err = Console(file=out, width=200), Console(file=err, width=200)
    code = 0
    try:
        with redirect_stdout(out), redirect_stderr(err):
            cli.main()
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    finally:
        sys.argv = old
        output.out, output.err = Console(), Console(stderr=True)
    return CliResult(code, out.getvalue(), err.getvalue())


@pytest.fixture
def cli():
    return run_cli


def raw_bytes(t: torch.Tensor) -> bytes:
    return t.contiguous().view(torch.uint8).numpy().tobytes() if t.numel() else b""


def load(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=False)


def rank_files(root: Path) -> list[Path]:
    return sorted(Path(root).rglob("model_optim_rng.pt"))


def tree_bytes(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(Path(root).rglob("*")) if p.is_file()}


def flip_dist_chunk(root: Path, out: Path, key: str, index: int | tuple, chunk: int = 0, whole: bool = False):
    """Copy the torch_dist checkpoint `root` to `out` and flip one bit of chunk number `chunk` of `key`
    (in `.metadata` order; -1: the last), in place in its .distcp file (same blob size), at element `index`
    of the chunk's int32 view. Returns the chunk's global offsets (`whole`: its whole .metadata record)."""
    import shutil
    import ckptctl.formats.torch_dist.metadata as td_metadata
    shutil.copytree(root, out)
    ck = td_metadata.open_dist(out)
    record = ck.index["tensors"][key]["chunks"][chunk]
    off, _, f, at, n = record
    t = td_metadata.load_tensor(ck.iter_dir, [f, at, n], key).clone()
    v = t.view(torch.int32)
    (v.reshape(-1) if isinstance(index, int) else v)[index] ^= 1
    buf = io.BytesIO()
    torch.save(t, buf)
    assert len(buf.getvalue()) == n
    with open(ck.iter_dir / f, "r+b") as fh:
        fh.seek(at)
        fh.write(buf.getvalue())
    return record if whole else off
