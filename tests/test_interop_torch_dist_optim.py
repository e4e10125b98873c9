"""Distributed-optimizer state in torch_dist against megatron-core 0.19.2 (tests/mcore/torch_dist_optim.py).

One torchrun launch (4 processes): megatron-core builds GPT (SwiGLU, GQA, vocab 512) + distributed optimizer
at A = tp2pp1dp2, takes two steps and saves model + optimizer with `dist_checkpointing.save` as Megatron-LM's
`save_checkpoint` does by default: the fully parallel save strategy over the DP group (its `.metadata` key
order follows the merged write plans, issue 10), `dp_reshardable` (and `fully_reshardable` as the reference;
plus a plain-strategy save of the same state); ckptctl converts A to legacy, torch_dist dp_reshardable and
fully_reshardable at B = tp1pp1dp4 (TP and DP change), to dp_reshardable at A, and A and A_fr to legacy at
C = tp1pp2dp2 (TP and PP change); megatron-core loads each and every weight, fp32 master, exp_avg, exp_avg_sq and step must equal,
byte for byte, its own reshard of the fully_reshardable save (at A: its own state). Megatron-core itself
cannot load a dp_reshardable checkpoint at another TP. The same launch covers the non-distributed optimizer
(plain Adam, bf16 model with fp32 masters, two steps, fully parallel save): megatron-core saves it at A, ckptctl
converts it to torch_dist at B and at A and to legacy at C; megatron-core loads B against its own reshard, and the A output has its keys and chunks.
Every loaded copy then takes one more step on a fixed batch in the same launch (tests/mcore/optim.py's rule):
bitwise against the same step from megatron-core's reshard at that layout, and against A's own next step
bitwise at A, within optim.TOLS at B and C; moments swapped or shifted in C_legacy make that step differ.
~45-55 s on 2 busy cores (the step checks add a few seconds).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import raw_bytes

pytestmark = pytest.mark.mcore

HARNESS = Path(__file__).parent / "mcore" / "torch_dist_optim.py"


@pytest.fixture(scope="module")
def oracle(tmp_path_factory):
    pytest.importorskip("megatron.core")
    work = tmp_path_factory.mktemp("td_optim")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=4", str(HARNESS),
           str(work), str(work / "r.json")]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore",
               PYTHONPATH=os.pathsep.join([str(Path(__file__).parents[1]), os.environ.get("PYTHONPATH", "")]))
    p = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert (work / "r.json").exists(), (p.stdout + p.stderr)[-4000:]
    return work, json.loads((work / "r.json").read_text())


@pytest.mark.parametrize("case", ["A_dp", "B_legacy", "B_dp", "B_fr", "B_adam", "C_legacy", "C_fr_legacy",
                                  "C_adam_legacy"])
def test_megatron_core_loads_bitwise(oracle, case):
    rows = [r for r in oracle[1]["rows"] if r.get("case") in (case, "convert")]
    assert len(rows) == 4, rows
    for r in rows:
        assert not r["problems"], r
        assert r["optimizer_tensors"] > 0 and r["tensors"] > r["optimizer_tensors"]


CASES = ["A_dp", "B_legacy", "B_dp", "B_fr", "B_adam", "C_legacy", "C_fr_legacy", "C_adam_legacy"]


def _rows(oracle, case: str) -> list[dict]:
    rows = [r for r in oracle[1]["rows"] if r.get("case") == case]
    assert len(rows) == 4, [r for r in oracle[1]["rows"] if r.get("case") in (case, "convert")]
    return rows


@pytest.mark.parametrize("case", CASES)
def test_next_step_equals_megatron_core_reshard_stepped(oracle, case):
    """One more step from ckptctl's conversion equals, byte for byte, the same step from megatron-core's own
    reshard loaded at that layout (at A: the live model's own step): weights, masters, moments, step."""
    for r in _rows(oracle, case):
        s = r["next_bitwise"]
        assert s["tensors"] == r["tensors"] and not s["bad"], (r["rank"], s)


@pytest.mark.parametrize("case", CASES)
def test_next_step_matches_a(oracle, case):
    """Against the step A itself took next: bitwise at A; at B and C (another TP, PP, DP: another float
    reduction order) within tests/mcore/optim.py's TOLS, the step count exact."""
    for r in _rows(oracle, case):
        s = r["next_vs_a"]
        assert s["tensors"] == r["tensors"] and not s["bad"], (r["rank"], s)
        if r["layout"] == "tp2pp1dp2":
            assert s["bitwise"] and s["tol"] is None
        else:
            assert not s["bitwise"] and set(s["max_diff"]) == {"weight", "param", "exp_avg", "exp_avg_sq", "step"}
            assert s["max_diff"]["step"] == 0.0
            assert all(s["max_diff"][k] <= s["tol"][k] for k in s["max_diff"])


def test_negative_control_tampered_moments_change_the_step(oracle):
    """C_legacy's moments swapped, or shifted onto other parameters' elements, give weights or fp32 masters
    outside TOLS after the step: the step check sees misplaced optimizer state."""
    for r in _rows(oracle, "C_legacy"):
        nc = r["negative_control_next"]
        assert set(nc) == {"swapped", "shifted"} and all(v["caught"] > 0 for v in nc.values()), (r["rank"], nc)
    assert oracle[1]["ok"]


def _index(root: Path) -> dict:
    import ckptctl.formats.torch_dist.metadata as td_metadata
    return td_metadata.open_dist(root).index


def test_dp_reshardable_chunks_as_megatron_core_saves_them(oracle):
    """A -> A: ckptctl's dp_reshardable keys, global shapes, chunk boxes and objects are megatron-core's."""
    work = oracle[0]
    ours, theirs = _index(work / "A_dp"), _index(work / "A")
    opt = lambda ix: {k: (v["shape"], sorted((c[0], c[1]) for c in v["chunks"]))  # noqa: E731
                      for k, v in ix["tensors"].items() if k.startswith("optimizer.")}
    assert opt(ours) and opt(ours) == opt(theirs)
    objs = lambda ix: sorted(k for k in ix["objects"] if k.startswith("optimizer."))  # noqa: E731
    assert objs(ours) == objs(theirs) and len(objs(ours)) == 6     # optimizer + 2 per_bucket, per TP rank


def test_fully_reshardable_keys_as_megatron_core(oracle):
    work = oracle[0]
    ours, theirs = _index(work / "B_fr"), _index(work / "A_fr")
    keys = lambda ix: {k: v["shape"] for k, v in ix["tensors"].items() if k.startswith("optimizer.")}  # noqa: E731
    assert keys(ours) and set(keys(ours)) == set(keys(theirs))
    for k, shape in keys(ours).items():              # vocab 512: padded to 512 at TP1 and TP2
        assert shape == keys(theirs)[k], k


@pytest.mark.parametrize("pair", [("A", "B_legacy"), ("A", "C_legacy"), ("A_fr", "C_fr_legacy"),
                                  ("A_adam", "C_adam_legacy"), ("A_nfp", "A")])
def test_verify_across_formats(oracle, pair):
    """verify compares optimizer state between mcore's torch_dist and ckptctl's legacy output bitwise (and
    checks every fp32 master against its weight on both sides)."""
    from ckptctl.verify import verify
    work = oracle[0]
    rep = verify(work / pair[0], work / pair[1])
    assert rep.ok, rep.differences[:4]
    assert any(r["key"].startswith("optim/exp_avg_sq/") for r in rep.table)


def test_fully_parallel_save_changes_only_the_key_order(oracle):
    """Megatron-LM's default fully parallel save: the same chunks as the plain save, in another `.metadata`
    key order (what issue 10's conversion took for the parameter order)."""
    work = oracle[0]
    fp, plain = _index(work / "A"), _index(work / "A_nfp")
    boxes = lambda ix: {k: sorted((c[0], c[1]) for c in v["chunks"]) for k, v in ix["tensors"].items()}  # noqa: E731
    assert boxes(fp) == boxes(plain)
    assert fp["order"] != plain["order"] and sorted(fp["order"]) == sorted(plain["order"])


def test_adam_keys_and_chunks_as_megatron_core_saves_them(oracle):
    """A -> A, non-distributed optimizer: ckptctl's optimizer.state.{exp_avg,exp_avg_sq,fp32_param}.* keys, global
    shapes, dtypes and chunk boxes are megatron-core's, the chunks byte-equal; so is the common `optimizer`
    (common_step and param groups) and the content metadata (no sharding type)."""
    import ckptctl.formats.torch_dist.metadata as td_metadata
    from ckptctl.optstate.subopt import canon
    work = oracle[0]
    ours, theirs = td_metadata.open_dist(work / "A_adam_td"), td_metadata.open_dist(work / "A_adam")
    opt = lambda ix: {k: (v["shape"], v["dtype"], sorted((c[0], c[1]) for c in v["chunks"]))  # noqa: E731
                      for k, v in ix["tensors"].items() if k.startswith("optimizer.")}
    assert opt(ours.index) == opt(theirs.index)
    assert {k.split(".")[2] for k in opt(ours.index)} == {"exp_avg", "exp_avg_sq", "fp32_param"}
    for k, t in ours.index["tensors"].items():
        if k.startswith("optimizer."):
            mine = {tuple(c[0]): c[2:] for c in t["chunks"]}
            for c in theirs.index["tensors"][k]["chunks"]:
                a = td_metadata.load_tensor(ours.iter_dir, mine[tuple(c[0])], k)
                b = td_metadata.load_tensor(theirs.iter_dir, c[2:], k)
                assert a.dtype == b.dtype and raw_bytes(a) == raw_bytes(b), k
    assert canon(ours.common["optimizer"]) == canon(theirs.common["optimizer"])
    assert ours.common["content_metadata"] == theirs.common["content_metadata"]
