"""Running a megatron-core harness script under torchrun, and the save -> convert -> check flow that
the family interop tests share (two launches for all cases of a family)."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(harness: Path, *args, nproc: int = 4, timeout: int = 400) -> None:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes=1", f"--nproc-per-node={nproc}",
           "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{_port()}", "--max-restarts=0", str(harness),
           *map(str, args)]
    p = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS="1"),
                       timeout=timeout)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]


def save_convert_check(harness: Path, work: Path, targets: dict) -> tuple[dict, dict]:
    """megatron-core saves every case at A; ckptctl converts (in process); megatron-core loads and checks.

    targets[case]: the layout of B (ckptctl converts CASE/A -> CASE/B), or a list of conversions
    (source dir, destination dir, layout, target format or None for the source's), all below CASE/.
    Returns (the check report, the rank dirs megatron-core wrote at A)."""
    from ckptctl.convert import convert
    from ckptctl.layout import parse_layout

    cases = sorted(targets)
    torchrun(harness, "save", work, *cases)
    dirs = {}
    for case in cases:
        dirs[case] = sorted(p.name for p in (work / case / "A" / "iter_0000001").iterdir())
        todo = targets[case]
        for src, dst, layout, fmt in ([("A", "B", todo, None)] if isinstance(todo, str) else todo):
            convert(work / case / src, work / case / dst, parse_layout(layout), nproc=0, to_format=fmt)
    report = work / "report.json"
    torchrun(harness, "check", work, report, *cases)
    return json.loads(report.read_text()), dirs
