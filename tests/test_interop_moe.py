"""MoE against megatron-core (sequential experts), in both formats: megatron-core saves layout A as legacy
files and as torch_dist (`dist_checkpointing.save`); ckptctl converts legacy A -> legacy B, torch_dist A ->
legacy B, and legacy A -> torch_dist at a layout W; megatron-core loads each at B (legacy strictly, torch_dist
with `dist_checkpointing.load`, every key requested and present): bytes equal to megatron-core's own
dist_checkpointing reshard, forward logits equal to A's (allgather token dispatcher).

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
from moe import CASES, LOADED  # noqa: E402  (the harness's case table: layouts A, B, W; what it loads at B)


@pytest.fixture(scope="module")
def interop(tmp_path_factory):
    work = tmp_path_factory.mktemp("moe_interop")
    return (*save_convert_check(HARNESS, work, {
        case: [("A", "B", b, None), ("dist", "BD", b, "legacy"), ("A", "BT", w, "torch_dist")]
        for case, (_, _, b, w) in CASES.items()}), work)


def test_megatron_writes_the_file_set_ckptctl_expects(interop):
    """megatron-core's writers (DP rank 0 or expert-DP rank 0) give exactly Layout.model_files."""
    from ckptctl.layout import Layout
    _, dirs, _ = interop
    for case, names in dirs.items():
        (tp, ep, etp), *_ = CASES[case]
        layout = Layout(tp=tp, ep=ep, etp=etp, dp=4 // tp)
        assert names == sorted(fc.dirname(layout) for fc in layout.model_files), case
    assert dirs["tp2ep2etp1_to_tp4ep1etp1"] == ["mp_rank_00_000", "mp_rank_01_001"]


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("name", [n for n, _ in LOADED])
def test_converted_checkpoints_load_strictly_with_megatron_bytes(interop, case, name):
    report, _, _ = interop
    ranks = report[case]
    assert len(ranks) == 4
    for r in ranks:
        assert r[name]["strict_load"] == "ok", (name, r)
        assert r[name]["mismatch"] == [], (name, r)
        assert r["tensors"] > 20


@pytest.mark.parametrize("case", sorted(CASES))
def test_forward_matches_layout_a(interop, case):
    report, _, _ = interop
    for r in report[case]:
        assert r["logit_diff_ref"] < 1e-4, r      # megatron-core's own reshard: the harness is sound
        for name, _ in LOADED:
            assert r[name]["logit_diff"] < 1e-4, (name, r)


@pytest.mark.parametrize("case", sorted(CASES))
def test_verify_megatron_torch_dist_against_its_legacy_files(interop, case):
    """ckptctl's reader on megatron-core's own MoE torch_dist (experts on their own axis, EP > 1): every
    global tensor byte-equal to the legacy files megatron-core wrote of the same model."""
    from ckptctl.verify import verify
    _, _, work = interop
    rep = verify(work / case / "dist", work / case / "A")
    assert rep.tensors > 20 and rep.equal == rep.tensors, rep
