"""What a Megatron user expects of the command line (issue 14): inspect, a dry run, --version, -h, help
without type tags, Megatron's words (torch format, parts in any order), JSON errors, --quiet, timings,
the flags that load the result, and verify's verdict by kind with the rank file of a bad element."""
import shutil

import pytest
import torch

from conftest import load, run_cli


@pytest.fixture(scope="module")
def src(tmp_path_factory):
    d = tmp_path_factory.mktemp("ux") / "src"
    r = run_cli("example", "gpt", "--layout", "tp2pp2", "--out", d, "--layers", "4")
    assert r.code == 0, r.err
    return d


@pytest.fixture(scope="module")
def converted(src, tmp_path_factory):
    d = tmp_path_factory.mktemp("ux") / "dst"
    r = run_cli("convert", src, d, "--to", "pp1tp4", "--to-format", "torch", "--nproc", "0", "--json")
    assert r.code == 0, r.err
    return d, r.json()


def test_version_and_short_help(cli):
    from importlib.metadata import version
    r = cli("--version")
    assert r.code == 0 and version("ckptctl") in r.out
    h = cli("convert", "-h")
    assert h.code == 0 and "--dry-run" in h.out


def test_bare_command_prints_help_without_error(cli):
    r = cli()
    assert r.code == 0 and "Commands" in r.out and "error" not in r.err


def test_help_has_no_type_tags_on_flags_and_text_on_every_option(cli):
    import re
    h = cli("convert", "--help").out
    for flag in ("--dry-run", "--overwrite", "--keep-store", "--no-optimizer", "--json"):
        line = next(ln for ln in h.splitlines() if flag in ln)
        assert "<bool>" not in line, line
    for opt in ("--tp", "--pp", "--vpp", "--ep", "--etp", "--dp"):   # each row carries help text after the type
        line = next(ln for ln in h.splitlines() if re.search(rf"{opt}\s", ln))
        assert re.search(r"<int>\s+\S", line), line
    e = cli("example", "--help").out
    for fam in ("bert", "gpt", "mamba", "moe", "t5"):
        assert fam in e
    assert "--no-swiglu" in e and "--debug" in cli("--help").out


def test_inspect_legacy(src, cli):
    r = cli("inspect", src, "--json")
    assert r.code == 0, r.err
    d = r.json()
    assert d["family"] == "gpt" and d["format"] == "legacy" and d["megatron_ckpt_format"] == "torch"
    assert d["layout"]["name"] == "tp2pp2" and d["layout"]["world_size"] == 4 and d["iteration"] == 10
    assert d["model"]["num_layers"] == 4
    assert d["optimizer"]["kind"] == "adam" and d["optimizer"]["components"] == ["exp_avg", "exp_avg_sq"]
    assert "rng_state" in d["training_state"] and "opt_param_scheduler" in d["training_state"]
    # weights: the global tensors' bytes, counted from the rank files independently of ckptctl's plan
    want = 0
    for f in sorted(src.rglob("model_optim_rng.pt")):
        sd = load(f)["model"]
        want += sum(t.numel() * t.element_size() for t in sd.values() if torch.is_tensor(t))
    assert 0 < d["bytes"]["weights"] < want                       # replicas and TP copies are counted once
    assert d["bytes"]["on_disk"] == sum(p.stat().st_size for p in (src / "iter_0000010").rglob("*") if p.is_file())
    t = cli("inspect", src)
    assert "tp2pp2" in t.out and "world size 4" in t.out and "adam" in t.out


def test_inspect_torch_dist_and_store(src, tmp_path, cli):
    td = tmp_path / "td"
    assert cli("example", "gpt", "--layout", "tp2pp1", "--layers", "2", "--format", "torch_dist", "--out", td).code == 0
    d = cli("inspect", td, "--json").json()
    assert d["format"] == "torch_dist" and d["megatron_ckpt_format"] == "torch_dist" and d["layout"]["tp"] == 2
    st = tmp_path / "s.zarr"
    assert cli("convert", src, st, "--nproc", "0").code == 0
    s = cli("inspect", st, "--json").json()
    assert s["kind"] == "store" and s["layout"]["name"] == "tp2pp2" and s["family"] == "gpt"
    assert s["bytes"]["weights"] == cli("inspect", src, "--json").json()["bytes"]["weights"]
    r = cli("convert", st, tmp_path / "s2.zarr", "--nproc", "0")   # a store from a store: nothing to do
    assert r.code == 2 and "already a store" in r.err and not (tmp_path / "s2.zarr").exists()


def test_dry_run_writes_nothing_and_plans_what_a_run_moves(src, converted, tmp_path, cli):
    dst = tmp_path / "dry"
    r = cli("convert", src, dst, "--to", "tp4pp1", "--nproc", "0", "--dry-run", "--json")
    assert r.code == 0, r.err
    assert not dst.exists() and list(tmp_path.iterdir()) == []
    d = r.json()
    assert d["dry_run"] and d["bytes"]["moved_per_phase"] == converted[1]["bytes"]
    assert d["rank_files_out"] == converted[1]["files_out"] == 4
    b = d["bytes"]   # the target, and a hidden store that references the weights: optimizer state + 5 %
    assert sum(x["bytes"] for x in d["disk"]) == b["moved_per_phase"] + b["optimizer"] + b["weights"] // 20
    assert "optimizer" in d["state"] and d["memory_per_worker"] > 0
    assert any("mp_rank_03/model_optim_rng.pt" in f for f in d["target_files"])


@pytest.mark.parametrize("fmt", ["torch", "torch_dist"])
def test_dry_run_lists_exactly_the_files_a_run_writes(fmt, tmp_path, cli):
    """Distributed optimizer (DP 2): legacy targets hold distrib_optim.pt beside each model file."""
    s = tmp_path / "s"
    assert cli("example", "gpt", "--layout", "tp2pp1dp2", "--out", s, "--layers", "2").code == 0
    args = ("convert", s, tmp_path / "d", "--to", "tp1pp2dp2", "--to-format", fmt, "--nproc", "0")
    dry = cli(*args, "--dry-run", "--json").json()
    assert cli(*args).code == 0
    wrote = sorted(str(f.relative_to(tmp_path / "d")) for f in (tmp_path / "d").rglob("*") if f.is_file())
    if fmt == "torch":
        assert sum(f.endswith("/distrib_optim.pt") for f in wrote) == 2
        assert sorted(dry["target_files"]) == wrote
    else:   # torch_dist: how many .distcp files (one per writer) is not known before the run: a pattern
        import fnmatch
        listed = [f.split(" (")[0] for f in dry["target_files"]]
        assert all(any(fnmatch.fnmatch(w, pat) for pat in listed) for w in wrote), (listed, wrote)
        assert all(any(fnmatch.fnmatch(w, pat) for w in wrote) for pat in listed), (listed, wrote)


def test_dry_run_refuses_what_a_run_refuses(src, tmp_path, cli):
    for extra in ((), ("--dry-run",)):
        r = cli("convert", src, tmp_path / "x", "--to", "tp3pp1", "--nproc", "0", *extra)
        assert r.code == 2 and "error:" in r.err
    assert list(tmp_path.iterdir()) == []


def test_json_errors_on_stdout(tmp_path, cli):
    r = cli("convert", tmp_path / "nope", tmp_path / "x", "--to", "tp1pp1", "--json")
    assert r.code == 2
    d = r.json()
    assert d["ok"] is False and d["exit_code"] == 2 and "nope" in d["error"]


def test_layout_words(src, tmp_path, cli):
    from ckptctl.layout import Layout, parse_layout
    assert parse_layout("pp2tp4") == Layout(tp=4, pp=2) and parse_layout("tp4dp2pp1") == Layout(tp=4, pp=1, dp=2)
    r = cli("convert", src, tmp_path / "x", "--to", "tp4pp1", "--tp", "2", "--json")
    assert r.code == 2 and "--tp" in r.json()["error"]
    # a torch_dist target keeps one writer per file set (legacy targets share files among all workers)
    n = cli("convert", src, tmp_path / "y", "--to", "tp1pp1", "--to-format", "torch_dist", "--nproc", "5",
            "--dry-run", "--json").json()
    assert n["workers"] == 4 and any("not 5" in x for x in n["notes"])


def test_converted_result_carries_timings_and_next_flags(converted, src, cli):
    dst, rep = converted
    assert set(rep["timings"]) >= {"inspect", "source", "target", "commit"}
    assert rep["wall_seconds"] >= rep["seconds"] > 0
    assert rep["bytes"] == rep["weight_bytes"] + rep["optimizer_bytes"] and rep["optimizer_bytes"] > 0
    flags = rep["next"]["flags"]
    assert flags[flags.index("--tensor-model-parallel-size") + 1] == "4"
    assert flags[flags.index("--ckpt-format") + 1] == "torch"
    assert cli("verify", src, dst).code == 0


def test_quiet_prints_nothing(src, tmp_path, cli):
    r = cli("convert", src, tmp_path / "q", "--to", "tp1pp1", "--nproc", "0", "--quiet")
    assert r.code == 0 and r.out == "" and r.err == ""


def test_verify_names_kind_weights_only_and_rank_file(src, tmp_path, cli):
    no_opt = tmp_path / "noopt"
    assert cli("convert", src, no_opt, "--to", "tp1pp1", "--nproc", "0", "--no-optimizer").code == 0
    r = cli("verify", src, no_opt)
    assert r.code == 1 and "DIFFERENT (1 optimizer)" in r.out
    assert cli("verify", src, no_opt, "--weights-only").code == 0
    bad = tmp_path / "bad"
    shutil.copytree(src, bad)
    f = bad / "iter_0000010/mp_rank_01_001/model_optim_rng.pt"
    sd = load(f)
    sd["model"]["decoder.layers.1.mlp.linear_fc2.weight"].view(-1).view(torch.uint8)[4 * 5] ^= 1   # element 5
    torch.save(sd, f)
    j = cli("verify", src, bad, "--json").json()
    (d,) = [x for x in j["differences"] if x["kind"] == "tensors"]
    assert d["where_b"]["file"].endswith("mp_rank_01_001/model_optim_rng.pt")
    assert d["where_b"]["local_index"] == [0, 5] and d["where_b"]["byte_offset"] == 20
    assert j["differ_by_kind"]["tensors"] == 1 and not j["ok"]


def test_log_output_one_line_per_phase_and_summary(src, tmp_path, cli):
    r = cli("convert", src, tmp_path / "log", "--to", "tp1pp1", "--nproc", "2")   # stderr is not a terminal here
    assert r.code == 0, r.err
    lines = [ln for ln in r.err.splitlines() if ln.startswith("tp2pp2 -> tp1pp1:")]
    assert len(lines) == 2 and "started" in lines[0] and "\r" not in r.err
    assert "time:" in r.out and "next: load it in Megatron-LM with" in r.out and "--ckpt-format torch" in r.out


def test_strict_verdict_says_why(converted, src, cli):
    r = cli("verify", src, converted[0], "--strict")
    assert r.code == 1   # TP4 re-padded the vocabulary: allowed, but not under --strict
    (verdict,) = [ln for ln in r.out.splitlines() if ln.startswith(("DIFFERENT", "EQUAL"))]
    assert verdict.startswith("DIFFERENT") and "with --strict vocab padding rows" in verdict and "args" in verdict


def test_completion_is_offered(cli):
    assert "--install-completion" in cli("--help").out


def test_every_option_of_every_command_has_help():
    import typer
    from ckptctl.cli import app
    root = typer.main.get_command(app)
    missing = [(n, p.name) for n, c in root.commands.items() for p in c.params if not getattr(p, "help", None)]
    assert not missing and all(p.help for p in root.params)


def test_notes_for_a_same_layout_copy_and_an_unknown_vocab(src, tmp_path, cli):
    same = cli("convert", src, tmp_path / "x", "--to", "pp2tp2", "--dry-run", "--json").json()
    assert any("full copy" in n for n in same["notes"])
    novocab = tmp_path / "novocab"
    shutil.copytree(src, novocab)
    for f in novocab.rglob("model_optim_rng.pt"):   # as many Megatron-LM runs save it
        sd = load(f)
        sd["args"].vocab_size = None
        torch.save(sd, f)
    d = cli("convert", novocab, tmp_path / "y", "--to", "tp4pp1", "--dry-run", "--json").json()
    assert any("--true-vocab-size" in n for n in d["notes"])
    assert not any("--true-vocab-size" in n for n in same["notes"])


@pytest.mark.parametrize("argv", [["convert", "{m}", "{d}", "--to", "tp1pp1"], ["verify", "{m}", "{m}"],
                                  ["digest", "{m}"], ["inspect", "{m}"]])
def test_a_missing_checkpoint_is_refused_before_torch_is_imported(argv, tmp_path):
    """A mistyped path is answered at once (exit 2, the path named), not after a 2-3 s torch import."""
    import subprocess
    import sys
    missing, dst = tmp_path / "nope", tmp_path / "out"
    args = [a.format(m=missing, d=dst) for a in argv]
    code = ("import sys; from ckptctl.cli import main; sys.argv = ['ckptctl'] + sys.argv[1:]\n"
            "try:\n    main()\nexcept SystemExit as e:\n    print('EXIT', e.code)\n"
            "print('HEAVY', sorted(m for m in ('torch', 'numpy', 'zarr') if m in sys.modules))")
    r = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True)
    assert "EXIT 2" in r.stdout and "HEAVY []" in r.stdout, r.stdout + r.stderr
    assert f"no checkpoint at {missing}" in r.stderr
    assert not dst.exists()


@pytest.mark.parametrize("argv,code", [(["inspect", "{s}", "--json"], 0), (["verify", "{s}", "{s}/nope", "--json"], 2)])
def test_the_command_exits_quickly_with_its_output_exit_handlers_and_code(argv, code, src):
    """`ckptctl` (ckptctl.__main__.entry) skips the interpreter's teardown of torch once a command is done: the JSON on a
    pipe must still be whole, exit handlers must still run and the exit code must be the command's."""
    import json
    import subprocess
    import sys
    prog = ("import atexit, sys, torch; from ckptctl.__main__ import entry\n"
            "atexit.register(lambda: print('HANDLER RAN', file=sys.stderr))\n"
            "sys.argv = ['ckptctl'] + sys.argv[1:]\nentry()\nprint('NOT REACHED')")
    r = subprocess.run([sys.executable, "-c", prog, *[a.format(s=src) for a in argv]], capture_output=True, text=True)
    assert r.returncode == code, r.stdout + r.stderr
    assert "HANDLER RAN" in r.stderr and "NOT REACHED" not in r.stdout
    d = json.loads(r.stdout)
    assert d.get("ok", True) is (code == 0) and (code == 0 or d["exit_code"] == code)
