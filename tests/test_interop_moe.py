"""MoE against megatron-core (sequential experts): save legacy files under layout A with megatron-core,
convert with ckptctl, load under layout B strictly; bytes equal to megatron-core's own dist_checkpointing
reshard, forward logits equal to A's (allgather token dispatcher).

Two torchrun launches for all cases (world 4): tests/mcore/moe.py save ..., then check ...
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("megatron.core")
pytestmark = pytest.mark.mcore

HARNESS = Path(__file__).parent / "mcore" / "moe.py"
sys.path.insert(0, str(HARNESS.parent))
from moe import CASES  # noqa: E402  (the harness's case table: layouts A and B)


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(*args) -> None:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes=1", "--nproc-per-node=4",
           "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{_port()}", "--max-restarts=0", str(HARNESS), *args]
    p = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS="1"), timeout=300)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]


@pytest.fixture(scope="module")
def interop(tmp_path_factory):
    from ckptctl.convert import convert
    from ckptctl.layout import parse_layout

    work = tmp_path_factory.mktemp("moe_interop")
    cases = sorted(CASES)
    torchrun("save", str(work), *cases)
    dirs = {}
    for case in cases:
        dirs[case] = sorted(p.name for p in (work / case / "A" / "iter_0000001").iterdir())
        convert(work / case / "A", work / case / "B", parse_layout(CASES[case][2]), nproc=0)
    report = work / "report.json"
    torchrun("check", str(work), str(report), *cases)
    return json.loads(report.read_text()), dirs


def test_megatron_writes_the_file_set_ckptctl_expects(interop):
    """megatron-core's writers (DP rank 0 or expert-DP rank 0) give exactly Layout.model_files."""
    from ckptctl.layout import Layout
    _, dirs = interop
    for case, names in dirs.items():
        (tp, ep, etp), _, _ = CASES[case]
        layout = Layout(tp=tp, ep=ep, etp=etp, dp=4 // tp)
        assert names == sorted(fc.dirname(layout) for fc in layout.model_files), case
    assert dirs["tp2ep2etp1_to_tp4ep1etp1"] == ["mp_rank_00_000", "mp_rank_01_001"]


@pytest.mark.parametrize("case", sorted(CASES))
def test_converted_files_load_strictly_with_megatron_bytes(interop, case):
    report, _ = interop
    ranks = report[case]
    assert len(ranks) == 4
    for r in ranks:
        assert r["strict_load"] == "ok", r
        assert r["mismatch"] == [], r
        assert r["tensors"] > 20


@pytest.mark.parametrize("case", sorted(CASES))
def test_forward_matches_layout_a(interop, case):
    report, _ = interop
    for r in report[case]:
        assert r["logit_diff_ref"] < 1e-4, r      # megatron-core's own reshard: the harness is sound
        assert r["logit_diff_ours"] < 1e-4, r
