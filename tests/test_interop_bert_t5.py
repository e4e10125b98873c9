"""BERT and T5 against megatron-core 0.19.2 (tests/mcore/bert_t5.py; DESIGN §4.5).

megatron-core builds each model under layout A and writes it as Megatron-LM does (legacy files) and
with dist_checkpointing; `ckptctl convert` takes the legacy files to layout B; megatron-core builds the
model under B, loads ckptctl's files strictly, and compares every tensor byte for byte with its own
resharding of the dist checkpoint, and the forward output with A's; also ckptctl's torch_dist at B
(`dist_checkpointing.load`, every key present), and ckptctl's reading of megatron-core's own torch_dist
(verify against its legacy files). Two torchrun launches in all.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("megatron.core")

HERE = Path(__file__).parent
JOB = HERE / "mcore" / "bert_t5.py"
sys.path.insert(0, str(HERE / "mcore"))
from bert_t5 import CASES  # noqa: E402


def torchrun(*args: str) -> None:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                        str(JOB), *args], capture_output=True, text=True, env=env, timeout=600)
    assert p.returncode == 0, (p.stdout + p.stderr)[-4000:]


@pytest.mark.mcore
def test_megatron_core_loads_converted_bert_and_t5(tmp_path, cli):
    torchrun("save", str(tmp_path))
    for name, (fam, (tpa, ppa), (tp, pp), _) in CASES.items():
        a, b = tmp_path / name / "a", tmp_path / name / "b"
        r = cli("convert", a, b, "--to", f"tp{tp}pp{pp}", "--nproc", "0", "--json")
        assert r.code == 0, r.out + r.err
        r = cli("verify", a, b, "--json")
        assert r.code == 0 and r.json()["ok"], r.out[-2000:]
        # torch_dist: ckptctl reads megatron-core's (same tensors as its legacy files) and writes one at B
        r = cli("verify", tmp_path / name / "dist", a, "--json")
        assert r.code == 0 and r.json()["equal"] == r.json()["tensors"] > 20, r.out[-2000:]
        r = cli("convert", a, tmp_path / name / "bt", "--to", f"tp{tp}pp{pp}", "--to-format", "torch_dist",
                "--nproc", "0")
        assert r.code == 0, r.out + r.err
    torchrun("load", str(tmp_path))
    result = json.loads((tmp_path / "result.json").read_text())
    assert set(result) == set(CASES)
    for name, ranks in result.items():
        assert len(ranks) == 2
        for res in ranks:
            assert res["mismatch"] == [], (name, res["mismatch"])
            assert res["tensors"] > 20
            if CASES[name][3].get("position") != "relative":
                assert res["logits_max_diff"] is not None and res["logits_max_diff"] <= 1e-4, (name, res)
