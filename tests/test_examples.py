"""examples/: the scripts a user copies. The ones that fit on one machine run here as a user runs them
(bash, the installed `ckptctl`), two at a time, each on its smallest setting; the multi-node ones are
checked for syntax and for the flags they pass existing in `ckptctl convert --help`."""
import os
import re
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
# script -> environment that keeps it tiny (the default sizes are already small)
RUNS = {
    "01_convert_and_verify.sh": {},
    "02_moe_change_ep.sh": {},
    "03_legacy_torch_dist_distopt.sh": {},
    "06_through_kept_store.sh": {"TARGETS": "tp4pp1"},
    "07_matrix_ci.sh": {"PAIRS": "tp2pp2:pp1tp1"},
}
CLUSTER = ["04_slurm_multinode.sbatch", "05_multinode_torchrun_style.sh"]


def test_every_example_is_listed():
    # .json: model configs for `ckptctl plan` (tests/test_plan_cmd.py runs them)
    assert sorted(p.name for p in EXAMPLES.iterdir() if p.suffix not in (".md", ".json")) == sorted([*RUNS, *CLUSTER])


@pytest.fixture(scope="module")
def ran(tmp_path_factory):
    def one(name):
        work = tmp_path_factory.mktemp(name.split("_")[0])
        env = dict(os.environ, WORK=str(work), OUT=str(work / "matrix.json"), **RUNS[name])
        env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"   # this env's ckptctl
        for k in ("CKPTCTL_DEBUG",):
            env.pop(k, None)
        p = subprocess.run(["bash", str(EXAMPLES / name)], cwd=work, env=env, capture_output=True, text=True,
                           timeout=300)
        return name, p, work
    with ThreadPoolExecutor(2) as pool:
        return {n: (p, w) for n, p, w in pool.map(one, RUNS)}


@pytest.mark.parametrize("name", list(RUNS))
def test_example_runs(ran, name):
    p, work = ran[name]
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
    if name == "07_matrix_ci.sh":
        assert "1 of 1 pairs pass" in p.stdout
    else:   # each conversion was verified equal, and nothing failed on the way
        assert p.stdout.count("EQUAL:") >= 1 and "DIFFERENT" not in p.stdout and "error:" not in p.stderr


@pytest.mark.parametrize("name", CLUSTER)
def test_cluster_examples_parse_and_use_real_flags(name):
    text = (EXAMPLES / name).read_text()
    assert subprocess.run(["bash", "-n", str(EXAMPLES / name)]).returncode == 0
    from conftest import run_cli
    helps = run_cli("convert", "--help").out
    for flag in set(re.findall(r"(--[a-z][a-z-]+)", text)):
        if flag.startswith(("--ntasks", "--nodes", "--cpus", "--mem", "--time", "--output", "--job")):
            continue   # sbatch / srun options
        assert flag in helps or flag in run_cli("verify", "--help").out, flag
