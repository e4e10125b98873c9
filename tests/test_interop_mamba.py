"""Hybrid Mamba models against megatron-core: save legacy files under layout A with megatron-core (a stand-in
`mamba_ssm` makes the mixer buildable on CPU), convert with ckptctl, load under layout B strictly; every
tensor byte-equal to megatron-core's own dist_checkpointing reshard (in_proj z/x/B/C/dt and conv1d x/B/C
segments, A_log, D, dt_bias, gated norm, out_proj, attention and MLP layers, '|' pattern segments).
No forward comparison: the scan kernels need CUDA.

Two torchrun launches for all cases (world 4), both formats: tests/mcore/mamba.py save ..., then check ...
"""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

pytest.importorskip("megatron.core")
pytestmark = pytest.mark.mcore

HARNESS = Path(__file__).parent / "mcore" / "mamba.py"
sys.path.insert(0, str(HARNESS.parent))
from mcore_launch import save_convert_check  # noqa: E402
from mamba import CASES, DIST_CASES  # noqa: E402  (the harness's case tables)


@pytest.fixture(scope="module")
def interop(tmp_path_factory):
    def todo(case, b):
        w = DIST_CASES.get(case)
        return [("A", "B", b, None)] + ([("dist", "BD", b, "legacy"), ("A", "BT", w, "torch_dist")] if w else [])
    return save_convert_check(HARNESS, tmp_path_factory.mktemp("mamba_interop"),
                              {case: todo(case, spec[4]) for case, spec in CASES.items()})


def test_megatron_writes_the_file_set_ckptctl_expects(interop):
    from ckptctl.layout import Layout
    _, dirs = interop
    for case, names in dirs.items():
        (tp, pp), *_ = CASES[case]
        layout = Layout(tp=tp, pp=pp, dp=4 // (tp * pp))
        assert names == sorted(fc.dirname(layout) for fc in layout.model_files), case


@pytest.mark.parametrize("case", sorted(CASES))
def test_converted_files_load_strictly_with_megatron_bytes(interop, case):
    report, _ = interop
    ranks = report[case]
    assert len(ranks) == 4
    for r in ranks:
        assert r["strict_load"] == "ok", r
        assert r["mismatch"] == [], r
        assert r["tensors"] > 8
        assert r["pattern"] == CASES[case][3], r          # the '|' segments follow the target PP*VPP
    keys = {k for r in ranks for k in r["keys"]}
    # megatron-core 0.19.2 writes the conv1d parameters under their legacy names
    assert any(k.endswith("mixer.conv1d_weight") for k in keys) and not any(".conv1d.weight" in k for k in keys)
    assert any(k.endswith("mixer.in_proj.weight") for k in keys)


@pytest.mark.parametrize("case", sorted(DIST_CASES))
def test_torch_dist_both_ways_with_megatron_bytes(interop, case):
    """mcore's torch_dist (numbered hybrid keys, in_proj z/x/B/C/dt and conv1d x/B/C as separate keys) ->
    ckptctl legacy at B, strict load; ckptctl's torch_dist at W -> dist_checkpointing.load at B: bytes."""
    report, _ = interop
    for r in report[case]:
        for name in ("BD", "BT"):
            assert r[name]["strict_load"] == "ok", (name, r[name])
            assert r[name]["mismatch"] == [], (name, r[name])
