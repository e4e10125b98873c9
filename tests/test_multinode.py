"""Multi-node convert: two torchrun node groups on loopback (two `--nnodes 2` launches) with the
store on a filesystem both see; node 0 commits, node 1 only works."""
from __future__ import annotations

import json
import socket
import subprocess
import sys

from conftest import rank_files


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_node_groups_convert_and_verify(tmp_path, cli):
    src, dst = tmp_path / "src", tmp_path / "dst"
    assert cli("example", "gpt", "--layout", "tp2pp2", "--swiglu", "--out", src).code == 0
    port = _port()
    cmd = [sys.executable, "-m", "ckptctl", "convert", str(src), str(dst), "--to", "tp1pp4", "--nproc", "1",
           "--nnodes", "2", "--master-addr", "127.0.0.1", "--master-port", str(port), "--json"]
    procs = [subprocess.Popen(cmd + ["--node-rank", str(r)], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
             for r in (1, 0)]
    outs = [p.communicate(timeout=300) for p in procs]
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, err.decode()[-800:]
    node1, node0 = (json.loads(o) for o, _ in outs)
    assert node0["files_out"] == 4 and node1["files_out"] == 0
    assert "node 0 commits" in node1["notes"][0]
    assert len(rank_files(dst)) == 4
    assert not any(p.name.startswith(".dst.ckptctl") for p in tmp_path.iterdir())   # node 0 cleaned up
    v = cli("verify", src, dst)
    assert v.code == 0, v.out


def test_multi_node_needs_the_master_address(tmp_path, cli):
    src = tmp_path / "src"
    assert cli("example", "gpt", "--layout", "tp2pp1", "--out", src).code == 0
    r = cli("convert", src, tmp_path / "dst", "--to", "tp1pp1", "--nnodes", "2", "--node-rank", "1")
    assert r.code == 2
    assert "--master-addr" in r.err
    r = cli("convert", src, tmp_path / "dst", "--to", "tp1pp1", "--nnodes", "2", "--node-rank", "2",
            "--master-addr", "127.0.0.1", "--master-port", "1234")
    assert r.code == 2 and "--node-rank 2" in r.err
    assert not (tmp_path / "dst").exists()
