"""`ckptctl digest` (issue 13): the fingerprint of model and optimizer state is the same for a checkpoint
and its conversions to other layouts and formats, the same for any number of workers and any memory
budget, and a flipped bit changes it and is named."""
import hashlib
import json
import shutil

import pytest
import torch

from ckptctl.convert import convert
from ckptctl.core import fingerprint as fpr
from ckptctl.digest import RECORD, digest
from ckptctl.example import example
from ckptctl.layout import parse_layout
from tests.conftest import run_cli

SMALL = {"layers": 2, "hidden": 32, "ffn": 64, "heads": 4, "vocab": 64}   # vocab 64: padded 256 at TP2, 512 at TP4


@pytest.fixture(scope="module")
def gpt(tmp_path_factory):
    t = tmp_path_factory.mktemp("digest")
    example("gpt", parse_layout("tp2pp2"), t / "src", dict(SMALL), optimizer="adam")
    r = run_cli("convert", t / "src", t / "tp1pp1", "--to", "tp1pp1", "--nproc", "0", "--digest", "-q")
    assert r.code == 0, r.err
    convert(t / "src", t / "tp4pp1", parse_layout("tp4pp1"), nproc=0)
    convert(t / "src", t / "dist", parse_layout("tp2pp2"), nproc=0, to_format="torch_dist")
    return t


def hashes(rep) -> dict:
    return {x["name"]: x["hash"] for x in rep.tensors}


def test_the_digest_is_the_same_across_layouts_and_formats(gpt):
    reps = {n: digest(gpt / n, nproc=0) for n in ("src", "tp1pp1", "tp4pp1", "dist")}
    src = reps["src"]
    names = set(hashes(src))
    assert any(n.startswith("optim/exp_avg_sq/") for n in names) and any(n.startswith("model/") for n in names)
    emb = next(x for x in src.tensors if x["name"] == "model/embedding.word_embeddings.weight")
    assert emb["shape"] == [64, 32]      # vocab rows cut to the true vocabulary: padding depends on TP
    for n, rep in reps.items():
        assert rep.ok and rep.format == ("torch_dist" if n == "dist" else "legacy")
        assert rep.root == src.root and hashes(rep) == hashes(src), n
    assert set(src.objects) == {"state/iteration", "state/checkpoint_version", "state/config", "optim/step",
                                "optim/param_groups"} and src.objects["state/iteration"]["value"] == 10
    assert len(src.root) == 64 and src.algorithm == "sha256"


def test_workers_and_memory_budget_do_not_change_the_digest(gpt, monkeypatch):
    """With 4 KiB blocks the tensors span many blocks, hashed in units spread over the workers and read in
    boxes of a small budget: the same root as one process, and as another layout's."""
    from ckptctl.reshard import stream
    monkeypatch.setattr(fpr, "BLOCK", 4096)
    one = digest(gpt / "src", nproc=0)
    monkeypatch.setattr(stream, "MIN_BLOCK", 1000)
    two = digest(gpt / "src", nproc=2, max_memory=1)   # boxes of 1000 bytes: never aligned with the blocks
    other = digest(gpt / "tp4pp1", nproc=2)
    assert one.root == two.root == other.root and hashes(one) == hashes(two)
    monkeypatch.undo()
    assert digest(gpt / "src", nproc=0).root != one.root   # the block size is part of the value


def test_tensor_hash_is_the_hash_of_its_c_order_blocks(gpt):
    """Re-derived here without ckptctl's gather: the global tensor from a TP1PP1 rank file."""
    rep = digest(gpt / "tp1pp1", nproc=0)
    sd = torch.load(next((gpt / "tp1pp1").rglob("model_optim_rng.pt")), weights_only=False)
    key = "decoder.layers.0.mlp.linear_fc1.weight"
    raw = sd["model"][key].contiguous().view(torch.uint8).numpy().tobytes()
    blocks = [hashlib.sha256(raw[i:i + fpr.BLOCK]).digest() for i in range(0, len(raw), fpr.BLOCK)]
    want = fpr.tensor_hash("model/" + key, "float32", list(sd["model"][key].shape), blocks)
    assert hashes(rep)["model/" + key] == want


def test_flat_boxes_tile_any_flat_range_in_order():
    import random
    rnd = random.Random(0)
    for _ in range(500):
        shape = tuple(rnd.randint(1, 5) for _ in range(rnd.randint(1, 4)))
        n = int(torch.tensor(shape).prod())
        lo = rnd.randint(0, n)
        hi = rnd.randint(lo, n)
        a = torch.arange(n).reshape(shape)
        got = [a[b.slices].reshape(-1) for b in fpr.flat_boxes(shape, lo, hi)]
        assert torch.equal(torch.cat(got) if got else torch.empty(0, dtype=torch.long), torch.arange(lo, hi))


def _flip(root, key, rank_file=0, byte=-1):
    f = sorted(root.rglob("model_optim_rng.pt"))[rank_file]
    sd = torch.load(f, weights_only=False)
    sd["model"][key].reshape(-1).view(torch.uint8)[byte] ^= 0x01
    torch.save(sd, f)


def test_a_flipped_bit_changes_the_root_and_is_named(gpt, tmp_path):
    record = tmp_path / "src.json"
    r = run_cli("digest", gpt / "src", "--nproc", "0", "--out", record, "--json")
    assert r.code == 0 and r.json()["root"] == json.loads(record.read_text())["root"]
    bad = tmp_path / "bad"
    shutil.copytree(gpt / "src", bad)
    _flip(bad, "decoder.layers.0.mlp.linear_fc1.weight", rank_file=2)   # mp_rank_01_000 (TP rank 1, stage 0)'s half of a split tensor
    r = run_cli("digest", bad, "--nproc", "2", "--check", record, "--json")
    d = r.json()
    assert r.code == 1 and d["root"] != json.loads(record.read_text())["root"] and not d["ok"]
    assert d["checked"][0]["differences"] == [{"name": "model/decoder.layers.0.mlp.linear_fc1.weight",
                                               "reason": "hash differs"}]


def test_a_replica_that_differs_is_reported_and_the_owner_hashed(gpt, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(gpt / "src", bad)
    _flip(bad, "decoder.layers.0.input_layernorm.weight", rank_file=2)   # TP rank 1: a copy of a replicated norm
    r = run_cli("digest", bad, "--nproc", "0", "--json")
    d = r.json()
    assert r.code == 1 and d["root"] == digest(gpt / "src", nproc=0).root
    assert [x["tensor"] for x in d["replicas_differ"]] == ["decoder.layers.0.input_layernorm.weight"]


def test_convert_digest_record_is_compared(gpt, tmp_path):
    rec = json.loads((gpt / "tp1pp1" / RECORD).read_text())
    assert rec["root"] == digest(gpt / "src", nproc=0).root and rec["record_of"].endswith("src")
    assert not any(p.name == RECORD for p in (gpt / "tp1pp1").rglob("iter_*/**/*"))   # top level only
    r = run_cli("digest", gpt / "tp1pp1", "--nproc", "0")
    assert r.code == 0 and "MATCHES" in r.out
    copy = tmp_path / "copy"
    shutil.copytree(gpt / "tp1pp1", copy)
    _flip(copy, "output_layer.weight", byte=-1)   # a vocab padding row (rows 64..127): not in the digest
    assert run_cli("digest", copy, "--nproc", "0").code == 0
    _flip(copy, "output_layer.weight", byte=0)
    r = run_cli("digest", copy, "--nproc", "0")
    assert r.code == 1 and "DIFFERENT" in r.out and "model/output_layer.weight" in r.out


def test_bad_input_is_one_line_naming_the_file(gpt, tmp_path):
    r = run_cli("digest", tmp_path / "nothing", "--json")
    assert r.code == 2 and str(tmp_path / "nothing") in r.out and r.json()["ok"] is False
    junk = tmp_path / "junk.json"
    junk.write_text("{not json")
    r = run_cli("digest", gpt / "src", "--check", junk)
    assert r.code == 2 and r.out == "" and str(junk) in r.err and "digest" not in r.err.split(str(junk))[0]


def test_moe_and_distributed_optimizer(tmp_path):
    example("moe", parse_layout("tp2pp1ep2"), tmp_path / "moe", dict(SMALL))
    convert(tmp_path / "moe", tmp_path / "moe11", parse_layout("tp1pp1ep1"), nproc=0)
    example("gpt", parse_layout("tp2pp1dp2"), tmp_path / "dist", dict(SMALL), optimizer="distributed")
    convert(tmp_path / "dist", tmp_path / "dist11", parse_layout("tp1pp1"), nproc=0)
    a, b = digest(tmp_path / "moe", nproc=2), digest(tmp_path / "moe11", nproc=0)
    assert a.root == b.root and any(".experts." in x["name"] for x in a.tensors)
    c, d = digest(tmp_path / "dist", nproc=0), digest(tmp_path / "dist11", nproc=0)
    assert c.root == d.root and any(x["name"].startswith("optim/") for x in c.tensors)
    assert a.root != c.root


def test_verify_digest_ends_on_equal_digests_and_else_compares_bytes(gpt, tmp_path):
    r = run_cli("verify", gpt / "src", gpt / "dist", "--digest", "--json")
    assert r.code == 0 and r.json()["verdict"].startswith("EQUAL by digest") and r.json()["digest"]["a"] == \
        r.json()["digest"]["b"]
    bad = tmp_path / "bad"
    shutil.copytree(gpt / "tp4pp1", bad)
    _flip(bad, "decoder.layers.1.self_attention.linear_proj.weight", rank_file=3, byte=0)
    r = run_cli("verify", gpt / "src", bad, "--digest", "--json")
    d = r.json()
    assert r.code == 1 and "digest" not in d and [x["key"] for x in d["differences"]] == \
        ["decoder.layers.1.self_attention.linear_proj.weight"] and d["differences"][0]["first_nd_index"] is not None


def _killed(unit):
    import os
    import signal
    os.kill(os.getpid(), signal.SIGKILL)


def test_a_dead_worker_is_exit_3(gpt, monkeypatch):
    from ckptctl import digest as dg
    monkeypatch.setattr(dg, "_one", _killed)   # the forked workers run this module's copy
    r = run_cli("digest", gpt / "src", "--nproc", "2")
    assert r.code == 3 and "a digest worker died" in r.err and r.out == ""


def test_unknown_true_vocab_is_noted_and_can_be_given(gpt, tmp_path):
    nov = tmp_path / "novocab"
    shutil.copytree(gpt / "tp4pp1", nov)
    for f in nov.rglob("model_optim_rng.pt"):   # as many Megatron-LM runs save it
        sd = torch.load(f, weights_only=False)
        sd["args"].vocab_size = None
        torch.save(sd, f)
    d = run_cli("digest", nov, "--nproc", "0", "--json").json()
    assert "true vocabulary size unknown" in d["notes"][0] and d["root"] != digest(gpt / "src", nproc=0).root
    given = digest(nov, true_vocab=64, nproc=0)
    assert not given.notes and given.root == digest(gpt / "src", nproc=0).root
