"""Optimizer state across a change in the number of sub-optimizers, against megatron-core 0.19.2
(tests/mcore/moe_optim.py; world 2, two torchrun launches for both cases).

megatron-core builds the MoE GPT of tests/mcore/moe.py at A = tp1pp1ep2 (dense + expert
sub-optimizers), with the distributed optimizer and with plain Adam, takes one step and saves as
Megatron-LM does. `ckptctl convert` writes B = tp1pp1dp2 (EP1: one sub-optimizer) and back to A.
megatron-core loads ckptctl's files as Megatron-LM does, at B and at A, and every weight, fp32
master, exp_avg, exp_avg_sq and step must equal, byte for byte, megatron-core's own resharding of
its dist checkpoint ('fully_reshardable'). megatron-core 0.19.2 cannot itself load that reshard
across the sub-optimizer change (its common part keeps the saved {0: dense, 1: expert} param groups):
the harness takes the dense groups, after checking that the expert ones equal them. In the same launches,
megatron-core also saves torch_dist as Megatron-LM does by default (dp_reshardable with two sub-optimizers,
`chained_<i>.` keys / plain Adam; fully parallel save over the DP group); ckptctl converts it to legacy at B,
and megatron-core loads that byte-equal to the same reshard (issue 10).
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

pytest.importorskip("megatron.core")
pytestmark = pytest.mark.mcore

HARNESS = Path(__file__).parent / "mcore" / "moe_optim.py"
sys.path.insert(0, str(HARNESS.parent))
from mcore_launch import torchrun  # noqa: E402

KINDS = ("distributed", "adam")
A, B = "tp1pp1ep2", "tp1pp1dp2"


@pytest.fixture(scope="module")
def oracle(tmp_path_factory):
    from ckptctl.convert import convert
    from ckptctl.layout import parse_layout

    work = tmp_path_factory.mktemp("moe_optim")
    torchrun(HARNESS, "save", work, *KINDS, nproc=2)
    reports = {}
    for kind in KINDS:
        reports[kind] = [convert(work / kind / "A", work / kind / "conv-B", parse_layout(B), nproc=0),
                         convert(work / kind / "conv-B", work / kind / "conv-A", parse_layout(A), nproc=0),
                         convert(work / kind / "td", work / kind / "conv-td-B", parse_layout(B), nproc=0,
                                 to_format="legacy")]
    torchrun(HARNESS, "check", work, work / "report.json", *KINDS, nproc=2)
    return work, json.loads((work / "report.json").read_text()), reports


@pytest.mark.parametrize("kind", KINDS)
def test_megatron_writes_two_sub_optimizers_at_a(oracle, kind):
    import torch
    work, _, reports = oracle
    it = work / kind / "A" / "iter_0000001"
    assert sorted(p.name for p in it.iterdir()) == ["mp_rank_00_000", "mp_rank_00_001"]
    for d in it.iterdir():
        assert len(torch.load(d / "model_optim_rng.pt", weights_only=False)["optimizer"]) == 2
    if kind == "distributed":      # EP rank 1's writer is dense DP rank 1: no dense state there
        assert torch.load(it / "mp_rank_00_001" / "distrib_optim.pt", weights_only=False)[0] is None
    to_b, back, _ = reports[kind]
    assert "sub-optimizers 2 -> 1" in to_b.policies["optimizer"]
    assert "sub-optimizers 1 -> 2" in back.policies["optimizer"]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("layout", ["B", "A"], ids=["A-to-B", "A-to-B-to-A"])
def test_loaded_state_equals_megatron_core_reshard(oracle, kind, layout):
    _, rows, _ = oracle
    mine = [r for r in rows if r["kind"] == kind and r["layout"] == layout]
    assert len(mine) == 2
    for r in mine:
        assert not r["problems"], r
        assert r["subs"] == (1 if layout == "B" else 2)
        assert r["tensors"] > 20 and r["steps"] == [1.0]
        if layout == "B":       # Megatron-LM's default torch_dist save (fully parallel) -> ckptctl legacy B
            assert r["td_tensors"] == r["tensors"]


@pytest.mark.parametrize("kind", KINDS)
def test_negative_control_swapped_moments_are_caught(oracle, kind):
    _, rows, _ = oracle
    assert all(r["negative_control"] > 0 for r in rows if r["kind"] == kind and r["layout"] == "B")
