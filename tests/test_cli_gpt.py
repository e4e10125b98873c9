"""GPT end to end through the CLI: example -> convert (torchrun workers) -> verify, and every bad input."""
import os
import shutil
from pathlib import Path

import pytest
import torch

from conftest import load, rank_files, raw_bytes, tree_bytes


@pytest.fixture(scope="module")
def src(tmp_path_factory):
    from conftest import run_cli
    d = tmp_path_factory.mktemp("gpt") / "src"
    r = run_cli("example", "gpt", "--layout", "tp2pp2", "--out", d, "--swiglu", "--groups", "4", "--vocab", "127")
    assert r.code == 0, r.err
    return d


def test_example_layout_on_disk(src):
    names = sorted(p.parent.name for p in rank_files(src))
    assert names == ["mp_rank_00_000", "mp_rank_00_001", "mp_rank_01_000", "mp_rank_01_001"]
    assert (src / "latest_checkpointed_iteration.txt").read_text() == "10"
    sd = load(rank_files(src)[0])
    assert sd["checkpoint_version"] == 3.0 and sd["args"].tensor_model_parallel_size == 2
    assert sd["model"]["embedding.word_embeddings.weight"].shape == (128, 64)   # 127 padded to 256 / TP2
    assert "decoder.layers.4.mlp.linear_fc1.weight" not in sd["model"]          # 4 local layers per stage


def test_convert_with_workers_then_verify(src, tmp_path, cli):
    before = tree_bytes(src)
    r = cli("convert", src, tmp_path / "dst", "--to", "tp4pp1", "--nproc", "2", "--json")
    assert r.code == 0, r.err
    rep = r.json()
    assert rep["workers"] == 2 and rep["files_out"] == 4 and rep["bytes"] > 0
    assert "rng_state" in rep["policies"]
    assert tree_bytes(src) == before                       # the source is never modified
    assert not list(tmp_path.glob(".dst.ckptctl-*"))      # no temporary left behind
    v = cli("verify", src, tmp_path / "dst", "--json")
    assert v.code == 0, v.out
    j = v.json()
    assert j["ok"] and j["tensors"] == j["equal"] > 30
    sd = load(tmp_path / "dst/iter_0000010/mp_rank_03/model_optim_rng.pt")
    assert sd["args"].tensor_model_parallel_size == 4 and sd["args"].pipeline_model_parallel_size == 1
    assert sd["args"].padded_vocab_size == 512


def test_round_trip_returns_identical_tensors(src, tmp_path, cli):
    assert cli("convert", src, tmp_path / "b", "--to", "tp1pp4", "--nproc", "0").code == 0
    assert cli("convert", tmp_path / "b", tmp_path / "a", "--to", "tp2pp2", "--nproc", "0").code == 0
    for f in rank_files(src):
        want, got = load(f)["model"], load(tmp_path / "a" / f.relative_to(src))["model"]
        assert list(want) == list(got)                     # same keys, same order
        for k, t in want.items():
            if torch.is_tensor(t):
                assert raw_bytes(got[k]) == raw_bytes(t), k
            else:
                assert got[k] is None and t is None


def test_store_halves(src, tmp_path, cli):
    assert cli("convert", src, tmp_path / "s.zarr", "--nproc", "0").code == 0
    assert (tmp_path / "s.zarr" / "zarr.json").is_file()
    assert cli("convert", tmp_path / "s.zarr", tmp_path / "d", "--to", "tp1pp2vpp2", "--nproc", "0").code == 0
    assert cli("verify", src, tmp_path / "d").code == 0
    sd = load(rank_files(tmp_path / "d")[0])
    assert {"model0", "model1"} <= set(sd)


def _flip(path: Path, key: str, chunk="model"):
    sd = load(path)
    sd[chunk][key].view(-1).view(torch.uint8)[0] ^= 1
    torch.save(sd, path)


def test_flipped_bit_in_a_replica_is_caught(src, tmp_path, cli):
    dst = tmp_path / "dst"
    assert cli("convert", src, dst, "--to", "tp4pp1", "--nproc", "0").code == 0
    # layer norm weights are replicated over TP: flip the copy on rank 3 only
    _flip(dst / "iter_0000010/mp_rank_03/model_optim_rng.pt", "decoder.layers.5.input_layernorm.weight")
    r = cli("verify", src, dst, "--json")
    assert r.code == 1
    keys = {d["key"] for d in r.json()["differences"]}
    assert "decoder.layers.5.input_layernorm.weight" in keys


def test_flipped_bit_reports_index_and_values(src, tmp_path, cli):
    dst = tmp_path / "dst"
    shutil.copytree(src, dst)
    _flip(dst / "iter_0000010/mp_rank_01_001/model_optim_rng.pt", "decoder.layers.1.mlp.linear_fc2.weight")
    r = cli("verify", src, dst, "--json")
    assert r.code == 1
    (d,) = r.json()["differences"]
    # rank 1 holds columns [F/2, F) of fc2 (H x F, F=128): its element 0 is global (0, 64)
    assert d["key"] == "decoder.layers.5.mlp.linear_fc2.weight" and d["count"] == 1
    assert d["first_nd_index"] == [0, 64] and d["a_hex"] != d["b_hex"]


# --- bad input: one line, exit 2, nothing written ---------------------------------------------

def _bad(cli, src, tmp_path, *extra):
    dst = tmp_path / "out"
    r = cli("convert", src, dst, "--to", "tp1pp1", "--nproc", "0", *extra)
    assert r.code == 2, (r.code, r.err)
    assert not dst.exists() and not list(tmp_path.glob(".out*"))
    assert len([line for line in r.err.splitlines() if line.startswith("error:")]) == 1
    return r.err


def test_missing_rank_file(src, tmp_path, cli):
    bad = tmp_path / "bad"
    shutil.copytree(src, bad)
    (bad / "iter_0000010/mp_rank_01_001/model_optim_rng.pt").unlink()
    assert "mp_rank_01_001" in _bad(cli, bad, tmp_path)


def test_truncated_rank_file(src, tmp_path, cli):
    bad = tmp_path / "bad"
    shutil.copytree(src, bad)
    f = bad / "iter_0000010/mp_rank_00_001/model_optim_rng.pt"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    err = _bad(cli, bad, tmp_path)
    assert "mp_rank_00_001" in err and "truncated" in err


def test_inconsistent_shapes_across_ranks(src, tmp_path, cli):
    bad = tmp_path / "bad"
    shutil.copytree(src, bad)
    f = bad / "iter_0000010/mp_rank_01_000/model_optim_rng.pt"
    sd = load(f)
    sd["model"]["decoder.layers.0.self_attention.linear_qkv.weight"] = torch.zeros(8, 64)
    torch.save(sd, f)
    assert "decoder.layers.0.self_attention.linear_qkv.weight" in _bad(cli, bad, tmp_path)


def test_unknown_parameter_name(src, tmp_path, cli):
    bad = tmp_path / "bad"
    shutil.copytree(src, bad)
    f = bad / "iter_0000010/mp_rank_00_000/model_optim_rng.pt"
    sd = load(f)
    sd["model"]["decoder.layers.0.mystery.weight"] = torch.zeros(3)
    torch.save(sd, f)
    assert "decoder.layers.0.mystery.weight" in _bad(cli, bad, tmp_path)


def test_unknown_top_level_key(src, tmp_path, cli):
    bad = tmp_path / "bad"
    shutil.copytree(src, bad)
    f = bad / "iter_0000010/mp_rank_00_000/model_optim_rng.pt"
    sd = load(f)
    sd["surprise"] = 1
    torch.save(sd, f)
    assert "surprise" in _bad(cli, bad, tmp_path)


def test_unsafe_pickle_is_refused(src, tmp_path, cli):
    bad = tmp_path / "bad"
    shutil.copytree(src, bad)
    f = bad / "iter_0000010/mp_rank_00_000/model_optim_rng.pt"
    sd = load(f)
    sd["args"].evil = os.system   # a global that is not on the allow-list
    torch.save(sd, f)
    assert "allow-list" in _bad(cli, bad, tmp_path)


def test_layout_mismatch_with_files(src, tmp_path, cli):
    bad = tmp_path / "bad"
    shutil.copytree(src, bad)
    shutil.copytree(bad / "iter_0000010/mp_rank_01_001", bad / "iter_0000010/mp_rank_02_001")
    assert "mp_rank_02_001" in _bad(cli, bad, tmp_path)


@pytest.mark.parametrize("layout,needle", [("tp3pp1", "divisible"), ("tp1pp3", "layers"), ("tp16pp1", "attention heads")])
def test_target_layout_that_does_not_divide(src, tmp_path, cli, layout, needle):
    r = cli("convert", src, tmp_path / "o", "--to", layout, "--nproc", "0")
    assert r.code == 2 and needle in r.err and not (tmp_path / "o").exists()


def test_bad_layout_string_and_existing_destination(src, tmp_path, cli):
    r = cli("convert", src, tmp_path / "o", "--to", "tp2xx", "--nproc", "0")
    assert r.code == 2 and "Expected a layout" in r.err
    (tmp_path / "o").mkdir()
    (tmp_path / "o" / "keep").write_text("x")
    r = cli("convert", src, tmp_path / "o", "--to", "tp1pp1", "--nproc", "0")
    assert r.code == 2 and "exists" in r.err and (tmp_path / "o" / "keep").read_text() == "x"


def test_missing_source(tmp_path, cli):
    r = cli("verify", tmp_path / "nope", tmp_path / "nope2")
    assert r.code == 2 and "nope" in r.err


def test_worker_failure_is_one_message_and_exit_3(src, tmp_path, cli, monkeypatch):
    monkeypatch.setenv("CKPTCTL_TEST_FAIL_RANK", "1")
    r = cli("convert", src, tmp_path / "o", "--to", "tp1pp1", "--nproc", "2")
    assert r.code == 3 and "injected failure on rank 1" in r.err
    assert not (tmp_path / "o").exists() and not list(tmp_path.glob(".o.ckptctl-*"))


def test_usage_errors_exit_2(cli):
    r = cli("convert", "a", "b", "--bogus")
    assert r.code == 2 and "--bogus" in r.err
    assert cli("verify").code == 2
