"""Optimizer-state oracle against megatron-core 0.19.2 (issue 4 item 6; tests/mcore/optim.py).

Layout A = tp2pp1dp2, layout B = tp1pp1dp4 (a TP change and a DP change, both 4 processes). For the
distributed optimizer and for plain Adam, each with an fp32 model and with a bf16 model (fp32 masters), megatron-core builds GPT + DDP + its optimizer
under A, takes one step on fixed data and saves as Megatron-LM core_v0.19.0 does (distrib_optim.pt
from every rank, then model_optim_rng.pt from the DP-rank-0 ranks), plus the same state through
dist_checkpointing ('fully_reshardable'), then takes step 2 and saves that too. `ckptctl convert`
writes A -> B and A -> A. Under each target layout megatron-core loads ckptctl's files as Megatron-LM
does and compares, byte for byte, every weight, fp32 master, exp_avg, exp_avg_sq and step with its
own resharding of the dist_checkpointing copy; both take step 2 and are compared again byte for byte;
step 2 is compared with the one taken at A: bitwise at A, within optim.TOLS at B (reduction order).

Two torchrun launches (save, check) plus eight in-process converts: ~60-80 s on 2 busy cores.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

pytestmark = [pytest.mark.mcore,
              pytest.mark.skipif(shutil.which("ckptctl") is None, reason="ckptctl is not on PATH (pip install -e .)")]

JOB = Path(__file__).parent / "mcore" / "optim.py"
A, B = "tp2pp1dp2", "tp1pp1dp4"
KINDS = ("distributed", "adam", "distributed-bf16", "adam-bf16")   # optimizer[-bf16 model]
CFG = dict(num_layers=2, hidden_size=64, num_attention_heads=8, ffn_hidden_size=128, vocab_size=128,
           seq_length=16, max_position_embeddings=16)


def torchrun(nproc: int, *args) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
           str(JOB), *map(str, args)]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)


def tail(p: subprocess.CompletedProcess, n: int = 3000) -> str:
    return (p.stdout + p.stderr)[-n:]


@pytest.fixture(scope="module")
def oracle(tmp_path_factory):
    work = tmp_path_factory.mktemp("optim_oracle")
    (work / "cfg.json").write_text(json.dumps(CFG))
    common = ["--cfg", work / "cfg.json", "--work", work, "--kinds", ",".join(KINDS)]
    save = torchrun(4, "save", "--layout", A, *common)
    assert save.returncode == 0, f"megatron-core save at {A} failed:\n{tail(save)}"

    def convert(job):
        kind, layout = job
        cmd = ["ckptctl", "convert", str(work / kind / "legacy"), str(work / kind / f"conv-{layout}"),
               "--to", layout, "--nproc", "0"]
        return cmd, subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    with ThreadPoolExecutor(2) as ex:
        convs = list(ex.map(convert, [(k, lay) for k in KINDS for lay in (B, A)]))
    for cmd, p in convs:
        assert p.returncode == 0, f"{' '.join(cmd)}\n{tail(p)}"
    check = torchrun(4, "check", "--layouts", f"{B},{A}", "--base", A, "--result", work / "result.json", *common)
    assert (work / "result.json").exists(), f"check launch failed:\n{tail(check)}"
    res = json.loads((work / "result.json").read_text())
    return {"work": work, "res": res, "check": check}


def rows(oracle, layout: str, kind: str) -> list[dict]:
    out = [r for r in oracle["res"]["rows"] if r["layout"] == layout and r["kind"] == kind]
    assert len(out) == 4, f"{layout} {kind}: results from {len(out)} of 4 ranks"
    return out


@pytest.mark.parametrize("kind", KINDS)
def test_saved_as_megatron_lm(oracle, kind):
    """The source is what Megatron-LM writes: one directory per TP rank (DP-rank-0 writers), with
    distrib_optim.pt beside model_optim_rng.pt for the distributed optimizer."""
    it = oracle["work"] / kind / "legacy" / "iter_0000001"
    assert sorted(p.name for p in it.iterdir()) == ["mp_rank_00", "mp_rank_01"]
    for d in it.iterdir():
        sd = torch.load(d / "model_optim_rng.pt", map_location="cpu", weights_only=False)
        dist = kind.startswith("distributed")
        assert sd["args"].use_distributed_optimizer is dist
        o = sd["optimizer"]
        groups = o["param_groups"] if "param_groups" in o else o["optimizer"]["param_groups"]
        assert ("fp32_from_fp16_params" in o) is (kind == "adam-bf16")
        assert [g["wd_mult"] for g in groups] == [1.0, 0.0]
        assert (d / "distrib_optim.pt").exists() is dist


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("layout", [B, A], ids=["A-to-B", "A-to-A"])
def test_loaded_state_equals_megatron_core_reshard(oracle, kind, layout):
    """Weights, fp32 masters, exp_avg, exp_avg_sq and step after loading ckptctl's files equal, byte for
    byte, what megatron-core's own resharding ('fully_reshardable' dist checkpoint) gives; and stay
    equal after the next step taken by both."""
    for r in rows(oracle, layout, kind):
        assert not r["problems"], f"rank {r['rank']}: {r['problems']}"
        assert r["loaded_vs_mcore"]["tensors"] > 0 and not r["loaded_vs_mcore"]["bad"]
        assert r["step2_vs_mcore_reshard"]["tensors"] == r["loaded_vs_mcore"]["tensors"]
        assert not r["step2_vs_mcore_reshard"]["bad"]


@pytest.mark.parametrize("kind", KINDS)
def test_next_step_at_b_matches_a_within_tolerance(oracle, kind):
    """Step 2 at B (from ckptctl's files) vs step 2 at A (resharded to B by megatron-core): within TOLS
    (TP changes float reduction order); the step count itself is exact."""
    for r in rows(oracle, B, kind):
        s = r["step2_vs_base"]
        assert s["tensors"] > 0 and not s["bad"], f"rank {r['rank']}: {s}"
        assert set(s["max_diff"]) == {"weight", "exp_avg", "exp_avg_sq", "step"} | {"param"}
        assert s["max_diff"]["step"] == 0.0
        assert all(s["max_diff"][k] <= s["tol"][k] for k in s["max_diff"])


@pytest.mark.parametrize("kind", KINDS)
def test_same_layout_continues_bitwise(oracle, kind):
    """A -> A through ckptctl, loaded and stepped at A: every tensor equals megatron-core's own step 2
    at A byte for byte."""
    for r in rows(oracle, A, kind):
        s = r["step2_vs_base"]
        assert s["bitwise"] and s["tensors"] > 0 and not s["bad"], f"rank {r['rank']}: {s}"


@pytest.mark.parametrize("kind", KINDS)
def test_negative_control_swapped_moments_are_caught(oracle, kind):
    """The oracle fails when exp_avg and exp_avg_sq are swapped in the converted files."""
    for r in rows(oracle, B, kind):
        assert r["negative_control"] > 0
    assert oracle["res"]["ok"], tail(oracle["check"])
