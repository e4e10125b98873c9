"""Start-up: forked workers (no torchrun agent on one node), their failure mapping, and the store's
fast array creation (metadata identical to what zarr itself writes)."""
from __future__ import annotations

import json
import os

import psutil
import zarr

from ckptctl.store import Store

from conftest import rank_files


def test_a_worker_killed_by_a_signal_is_exit_3_and_leaves_nothing(tmp_path, cli, monkeypatch):
    src = tmp_path / "src"
    assert cli("example", "gpt", "--layout", "tp2pp1", "--out", src).code == 0
    before = {p.pid for p in psutil.Process().children(recursive=True)}
    monkeypatch.setenv("CKPTCTL_TEST_KILL_RANK", "1")
    r = cli("convert", src, tmp_path / "o", "--to", "tp1pp1", "--nproc", "2")
    assert r.code == 3, r.err
    assert "worker 1 died: SIGKILL" in r.err
    assert not (tmp_path / "o").exists() and not list(tmp_path.glob(".o.ckptctl-*"))
    left = [p for p in psutil.Process().children(recursive=True) if p.pid not in before and p.is_running()
            and p.status() != psutil.STATUS_ZOMBIE]
    assert not left, left                      # the surviving worker was stopped, not left waiting on gloo
    monkeypatch.delenv("CKPTCTL_TEST_KILL_RANK")
    r = cli("convert", src, tmp_path / "o", "--to", "tp1pp1", "--nproc", "2", "--json")
    assert r.code == 0, r.err
    assert r.json()["workers"] == 2 and len(rank_files(tmp_path / "o")) == 1


def test_fast_array_metadata_is_what_zarr_writes(tmp_path):
    specs = {
        "model/a.weight": {"shape": [6, 4], "dtype": "bfloat16", "chunks": [3, 4]},
        "model/b.weight": {"shape": [10, 2], "dtype": "bfloat16", "chunks": [5, 2]},   # templated from a
        "model/deep/c": {"shape": [7], "dtype": "float32", "chunks": [7]},
        "optim/d": {"shape": [2, 3, 4], "dtype": "float32", "chunks": [1, 3, 4]},        # new parent group
        "s0": {"shape": [], "dtype": "int64", "chunks": []},
        "s1": {"shape": [], "dtype": "int64", "chunks": []},
        "flag": {"shape": [3], "dtype": "bool", "chunks": [3]},
        "flag2": {"shape": [5], "dtype": "bool", "chunks": [5]},
        "e": {"shape": [0, 4], "dtype": "float16", "chunks": [1, 4]},
        "f": {"shape": [8, 4], "dtype": "float16", "chunks": [8, 4]},
    }
    Store.create(tmp_path / "fast", specs, {"format": "ckptctl-store"})
    ref = zarr.open_group(str(tmp_path / "ref"), mode="w", zarr_format=3)
    from ckptctl.store import storage_dtype
    for name, s in specs.items():
        ref.create_array(name, shape=tuple(s["shape"]), dtype=storage_dtype(s["dtype"]), chunks=tuple(s["chunks"]),
                         compressors=zarr.codecs.Crc32cCodec(), filters=None, fill_value=0,
                         attributes={"torch_dtype": s["dtype"]})

    def docs(root):
        return {os.path.relpath(d, root): json.load(open(os.path.join(d, "zarr.json")))
                for d, _, files in os.walk(root) if "zarr.json" in files and d != str(root)}

    assert docs(tmp_path / "fast") == docs(tmp_path / "ref")
    st = Store.open(tmp_path / "fast", mode="r+")
    import torch
    from ckptctl.box import Box
    w = torch.arange(20, dtype=torch.float32).to(torch.bfloat16).reshape(10, 2)
    st.write("model/b.weight", Box((0, 0), (10, 2)), w)
    back = Store.open(tmp_path / "fast").read("model/b.weight", Box((5, 0), (5, 2)))
    assert back.dtype == torch.bfloat16 and back.view(torch.uint16).tolist() == w[5:].view(torch.uint16).tolist()
