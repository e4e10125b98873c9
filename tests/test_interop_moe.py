"""MoE against megatron-core (sequential experts): save legacy files under layout A with megatron-core,
convert with ckptctl, load under layout B strictly; bytes equal to megatron-core's own dist_checkpointing
reshard, forward logits equal to A's (allgather token dispatcher).

Two torchrun launches for all cases (world 4): tests/mcore/moe.py save ..., then check ...
"""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

pytest.importorskip("megatron.core")
pytestmark = pytest.mark.mcore

HARNESS = Path(__file__).parent / "mcore" / "moe.py"
sys.path.insert(0, str(HARNESS.parent))
from mcore_launch import save_convert_check  # noqa: E402
from moe import CASES  # noqa: E402  (the harness's case table: layouts A and B)


@pytest.fixture(scope="module")
def interop(tmp_path_factory):
    return save_convert_check(HARNESS, tmp_path_factory.mktemp("moe_interop"),
                              {case: spec[2] for case, spec in CASES.items()})


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
