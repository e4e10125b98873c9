"""`convert HF_DIR DST --to L --fresh-optimizer KIND,lr=...`: the optimizer state a fresh run holds, judged by
megatron-core 0.19.2 (one 2-process launch, tests/mcore/hf_fresh.py): loaded as Megatron-LM loads it (legacy
and torch_dist, Adam and distributed, TP2 and DP2), one step gives the same bytes (weights, fp32 masters,
moments, step) as a freshly built optimizer over the same weights; a changed moment does not. Plus the files
(iteration 0, scheduler at step 0, the run's hyperparameters) and the refusals."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("safetensors")
HERE = Path(__file__).parent
CASES = ["adam_bf16_legacy_tp2", "dist_bf16_legacy_dp2", "dist_fp32_torch_dist_dp2", "adam_bf16_torch_dist_tp2"]


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    pytest.importorskip("megatron.core")
    w = tmp_path_factory.mktemp("hf_fresh")
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
                        str(HERE / "mcore" / "hf_fresh.py"), "run", str(w)], capture_output=True, text=True, env=env,
                       timeout=600)
    assert (w / "result.json").exists(), (p.stdout + p.stderr)[-4000:]
    res = json.loads((w / "result.json").read_text())
    assert not res["errors"], res["errors"][0]
    return w, res


@pytest.mark.mcore
@pytest.mark.parametrize("case", CASES)
def test_loaded_fresh_state_steps_like_a_fresh_optimizer(work, case):
    _, res = work
    for r in res[case]:
        assert "error" not in r, r["error"]
        assert r["loaded_step"] == [0.0]
        assert r["compared"] > 0 and r["mismatch"] == [], r["mismatch"]


@pytest.mark.mcore
def test_negative_control_a_changed_moment_is_seen(work):
    _, res = work
    assert all(r["control_mismatch"] > 0 for r in res[CASES[0]])


@pytest.mark.mcore
def test_files_are_an_iteration_0_checkpoint_with_the_run_hyperparameters(work):
    w, _ = work
    root = w / "dist_bf16_legacy_dp2"
    assert (root / "latest_checkpointed_iteration.txt").read_text() == "0"
    sd = torch.load(root / "iter_0000000" / "mp_rank_00" / "model_optim_rng.pt", map_location="cpu", weights_only=False)
    a = sd["args"]
    assert (a.lr, a.min_lr, a.adam_beta2, a.use_distributed_optimizer, a.iteration, a.consumed_train_samples) == \
        (3e-4, 3e-5, 0.95, True, 0, 0)
    assert sd["iteration"] == 0 and sd["opt_param_scheduler"]["num_steps"] == 0 and "rng_state" not in sd
    groups = sd["optimizer"]["optimizer"]["param_groups"]
    assert {(g["betas"], g["eps"], g["max_lr"], g["min_lr"], g["step"]) for g in groups} == {((0.9, 0.95), 1e-8, 3e-4,
                                                                                              3e-5, 0.0)}
    assert (root / "iter_0000000" / "mp_rank_00" / "distrib_optim.pt").exists()


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """A Llama-style example and its Hugging Face export."""
    from conftest import run_cli
    d = tmp_path_factory.mktemp("fresh_cli")
    r = run_cli("example", "gpt", "--layout", "tp1pp1", "--out", d / "meg", "--swiglu", "--norm", "RMSNorm",
                "--position", "rope", "--no-bias", "--layers", "1", "--optimizer", "none")
    assert r.code == 0, r.err
    assert run_cli("convert", d / "meg", d / "hf", "--to-format", "hf").code == 0
    return d


@pytest.mark.parametrize("spec,msg", [("adam", "give the run's lr"), ("sgd,lr=1", "expected adam or distributed"),
                                      ("adam,lr=1,beta=2", "'beta=2': expected key=value"),
                                      ("adam,lr=x", "lr='x' is not a number")])
def test_refusals_exit_2_before_output(cli, folders, spec, msg):
    d = folders
    r = cli("convert", d / "hf", d / "out", "--to", "tp2", "--fresh-optimizer", spec)
    assert r.code == 2 and msg in r.err and len(r.err.strip().splitlines()) <= 2, r.err
    r = cli("convert", d / "meg", d / "out", "--to", "tp2", "--fresh-optimizer", "adam,lr=1")
    assert r.code == 2 and "only for a source without optimizer state" in r.err, r.err
    assert sorted(p.name for p in d.iterdir()) == ["hf", "meg"]


def test_next_line_says_how_megatron_lm_loads_it(cli, folders, tmp_path):
    r = cli("convert", folders / "hf", tmp_path / "out", "--to", "tp1dp2", "--fresh-optimizer",
            "distributed,lr=1e-4", "--json")
    assert r.code == 0, r.err
    rep = r.json()
    assert rep["next"]["line"].endswith("--use-distributed-optimizer --no-load-rng --override-opt_param-scheduler")
    assert rep["policies"]["optimizer"].startswith("converted: fresh distributed state made on import")
