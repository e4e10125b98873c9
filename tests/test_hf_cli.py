"""The Hugging Face format through the command line: convert both ways, verify, inspect, dry run, refusals
(exit 2, one line, nothing written), --json, --format-option."""
from __future__ import annotations

import json

import pytest

pytest.importorskip("safetensors")

LLAMA = ["--swiglu", "--norm", "RMSNorm", "--position", "rope", "--no-bias", "--groups", "2", "--layers", "2",
         "--vocab", "100"]


@pytest.fixture(scope="module")
def src(tmp_path_factory):
    from conftest import run_cli
    d = tmp_path_factory.mktemp("hfcli")
    r = run_cli("example", "gpt", "--layout", "tp2pp1", "--out", d / "meg", *LLAMA)   # with Adam state
    assert r.code == 0, r.err
    r = run_cli("convert", d / "meg", d / "hf", "--to-format", "hf", "--format-option", "shard_size=100KB", "--json")
    assert r.code == 0, r.err
    return d, r.json()


def test_export_report_and_files(src):
    d, rep = src
    assert rep["ok"] if "ok" in rep else True
    assert rep["next"] is None                          # no Megatron-LM flags for a Hugging Face folder
    assert any("optimizer state not converted" in n for n in rep["notes"])
    names = sorted(p.name for p in (d / "hf").iterdir())
    assert "config.json" in names and "model.safetensors.index.json" in names
    assert sum(n.endswith(".safetensors") for n in names) > 1
    assert json.loads((d / "hf" / "config.json").read_text())["architectures"] == ["LlamaForCausalLM"]


def test_import_verify_inspect(src, cli):
    d, _ = src
    r = cli("convert", d / "hf", d / "back", "--to", "tp1pp2", "--json")
    assert r.code == 0, r.err
    assert "--ckpt-format torch" in r.json()["next"]["line"]          # legacy by default from an hf source
    assert (d / "back" / "latest_checkpointed_iteration.txt").read_text() == "release"
    # (meg vs back would differ in the trained padding rows past the true vocabulary, which HF drops)
    for a, b in ((d / "meg", d / "hf"), (d / "hf", d / "back")):
        v = cli("verify", a, b, "--weights-only", "--json")
        assert v.code == 0, v.out
        assert v.json()["ok"]
    i = cli("inspect", d / "hf", "--json")
    assert i.code == 0, i.err
    info = i.json()
    assert info["format"] == "hf" and info["family"] == "gpt"


def test_verify_finds_a_changed_hf_tensor(src, cli, tmp_path):
    import shutil

    import torch
    from safetensors.torch import load_file, save_file
    d, _ = src
    shutil.copytree(d / "hf", tmp_path / "bad")
    idx = json.loads((tmp_path / "bad" / "model.safetensors.index.json").read_text())["weight_map"]
    key = "model.layers.1.self_attn.k_proj.weight"
    f = tmp_path / "bad" / idx[key]
    ts = load_file(str(f))
    ts[key].view(torch.int32).view(-1)[5] ^= 1
    save_file(ts, str(f), metadata={"format": "pt"})
    v = cli("verify", d / "meg", tmp_path / "bad", "--weights-only", "--json")
    assert v.code == 1
    assert [x["key"] for x in v.json()["differences"]] == ["decoder.layers.1.self_attention.linear_qkv.weight"]


def test_dry_run_lists_the_files(src, cli):
    d, _ = src
    r = cli("convert", d / "meg", d / "dry", "--to-format", "hf", "--dry-run", "--json")
    assert r.code == 0, r.err
    assert not (d / "dry").exists()


@pytest.mark.parametrize("args,msg", [
    (["--format-option", "shard_size"], "expected KEY=VALUE"),
    (["--format-option", "color=red"], "option 'color'"),
    (["--format-option", "dtype=int8"], "dtype: expected"),
    (["--format-option", "arch=gemma"], "expected one of llama"),
])
def test_bad_options_exit_2(src, cli, args, msg):
    d, _ = src
    r = cli("convert", d / "meg", d / "x", "--to-format", "hf", *args)
    assert r.code == 2 and msg in r.err, r.err
    assert len(r.err.strip().splitlines()) <= 2
    assert not (d / "x").exists()


@pytest.mark.parametrize("arch,msg", [("mixtral", "a dense model has no experts"),
                                      ("qwen2", "Qwen2 has biases on q/k/v_proj only")])
def test_arch_refused_in_the_cli_before_workers(src, cli, arch, msg):
    """`arch=` a model cannot be exported as: refused in the CLI process (one line, exit 2, nothing written, no
    worker started), from a checkpoint and from a store."""
    d, _ = src
    if not (d / "st.zarr").exists():
        assert cli("convert", d / "meg", d / "st.zarr").code == 0
    for s in (d / "meg", d / "st.zarr"):
        r = cli("convert", s, d / "x", "--to-format", "hf", "--format-option", f"arch={arch}")
        assert r.code == 2 and f"cannot export as {arch} exactly: {msg}" in r.err, r.err
        assert "worker" not in r.err and len(r.err.strip().splitlines()) <= 2
        assert not (d / "x").exists() and not list(d.glob(".x*"))


def test_moe_grouped_gemm_refused_where_it_cannot_apply(src, cli):
    d, _ = src
    r = cli("convert", d / "hf", d / "x", "--to", "tp1", "--moe-grouped-gemm")
    assert r.code == 2 and "is a dense model (no experts)" in r.err, r.err
    r = cli("convert", d / "meg", d / "x", "--to", "tp1", "--moe-grouped-gemm")
    assert r.code == 2 and "only for a Hugging Face source" in r.err, r.err
    assert not (d / "x").exists()


def test_refusal_is_one_line_exit_2(cli, tmp_path):
    r = cli("example", "gpt", "--layout", "tp1pp1", "--out", tmp_path / "ln", "--layers", "2", "--optimizer", "none")
    assert r.code == 0
    r = cli("convert", tmp_path / "ln", tmp_path / "hf", "--to-format", "hf", "--json")
    assert r.code == 2
    err = r.json()
    assert err["exit_code"] == 2 and "learned absolute position embeddings" in err["error"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ln"]


def test_true_vocab_from_the_option_when_args_lack_it(cli, tmp_path):
    """args.vocab_size None (a real tokenizer): the export needs --true-vocab-size, and drops the rows past it."""
    import torch
    r = cli("example", "gpt", "--layout", "tp1pp1", "--out", tmp_path / "meg", "--optimizer", "none", *LLAMA)
    assert r.code == 0, r.err
    for f in (tmp_path / "meg").rglob("model_optim_rng.pt"):
        sd = torch.load(f, map_location="cpu", weights_only=False)
        sd["args"].vocab_size = None
        torch.save(sd, f)
    r = cli("convert", tmp_path / "meg", tmp_path / "hf", "--to-format", "hf")
    assert r.code == 2 and "--true-vocab-size" in r.err, r.err
    assert not (tmp_path / "hf").exists()
    r = cli("convert", tmp_path / "meg", tmp_path / "hf", "--to-format", "hf", "--true-vocab-size", "100")
    assert r.code == 0, r.err
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["vocab_size"] == 100
