"""torch_dist interop against megatron-core 0.19.2 (tests/mcore/torch_dist.py), bytes and logits.

megatron-core saves a GPT (GLU, GQA, tied embeddings) with `dist_checkpointing.save` at tp2pp2;
ckptctl converts it to legacy at tp4pp1, and that legacy checkpoint to torch_dist at tp1pp2.
megatron-core then builds the model at tp4pp1 and at tp1pp1: it loads its own checkpoint with
`dist_checkpointing.load` (its own resharding: the expectation), ckptctl's legacy files strictly and
ckptctl's torch_dist with `dist_checkpointing.load`, and compares every local tensor byte for byte and
the forward logits across the two layouts.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.mcore

HARNESS = Path(__file__).parent / "mcore" / "torch_dist.py"


def torchrun(n: int, *args) -> None:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(n),
           str(HARNESS), *map(str, args)]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]


def reports(path: Path) -> list[dict]:
    return json.loads(path.read_text())


@pytest.fixture(scope="module")
def oracle(tmp_path_factory):
    pytest.importorskip("megatron.core")
    from conftest import run_cli
    d = tmp_path_factory.mktemp("td-oracle")
    torchrun(4, "save", d / "mcore", "--layout", "tp2pp2", "--tied")
    r = run_cli("convert", d / "mcore", d / "legacy", "--to", "tp4pp1", "--to-format", "legacy", "--nproc", "0", "--json")
    assert r.code == 0, r.err
    r = run_cli("convert", d / "legacy", d / "dist", "--to", "tp1pp2", "--to-format", "torch_dist", "--nproc", "0")
    assert r.code == 0, r.err
    torchrun(4, "check", d / "tp4.json", "--layout", "tp4pp1", "--tied", "--ref", d / "mcore",
             "--legacy", d / "legacy", "--dist", d / "dist")
    torchrun(1, "check", d / "tp1.json", "--layout", "tp1pp1", "--tied", "--ref", d / "mcore", "--dist", d / "dist")
    return d


def test_mcore_torch_dist_to_legacy_loads_strictly_and_matches(oracle):
    for rep in reports(oracle / "tp4.json"):
        assert rep["tensors"] > 30
        assert str(oracle / "legacy") in rep["loaded"]
        assert rep["mismatch"] == []


def test_our_torch_dist_loads_in_mcore_under_two_layouts(oracle):
    for name in ("tp4.json", "tp1.json"):
        for rep in reports(oracle / name):
            assert str(oracle / "dist") in rep["loaded"]
            assert rep["mismatch"] == [], (name, rep["mismatch"][:3])


def test_forward_logits_agree_across_layouts(oracle):
    tp4, tp1 = reports(oracle / "tp4.json")[0]["logits"], reports(oracle / "tp1.json")[0]["logits"]
    ref = tp1["ref"]
    assert len(ref) > 1000
    for got in (tp4[str(oracle / "legacy")], tp4[str(oracle / "dist")], tp1[str(oracle / "dist")]):
        assert max(abs(a - b) for a, b in zip(got, ref)) < 1e-4
    assert tp1[str(oracle / "dist")] == tp1["ref"]          # same layout, same bytes: identical logits


def test_verify_across_formats_against_mcore_checkpoint(oracle, cli):
    v = cli("verify", oracle / "mcore", oracle / "legacy", "--json")
    assert v.code == 0, v.out
    assert v.json()["equal"] == v.json()["tensors"] > 30
    v = cli("verify", oracle / "dist", oracle / "mcore", "--json")
    assert v.code == 0, v.out
