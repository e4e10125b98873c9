"""Streaming under a memory budget: the torch.save-compatible writer, row blocks, and a conversion
whose workers stay under --max-memory although one tensor is larger than the budget."""
from __future__ import annotations

import argparse
import io
import json
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest
import torch

from ckptctl.box import Box
from ckptctl.models.rules import Piece
from ckptctl.reshard.stream import LazyTensor, parse_size, row_blocks, save_streaming, sub_piece

from conftest import raw_bytes


def _blocks(t: torch.Tensor, rows: int):
    def fill(write):
        for r in range(0, t.shape[0], rows):
            write(t[r:r + rows])
    return fill


def test_streaming_file_is_what_torch_save_writes(tmp_path):
    g = torch.Generator().manual_seed(0)
    w = torch.randn(300, 70, generator=g).to(torch.bfloat16)
    v = torch.randn(1000, generator=g)
    rest = {"args": argparse.Namespace(hidden_size=70), "iteration": 3, "rng": torch.Generator().get_state(),
            "x": io.BytesIO(b"te"), "empty": torch.empty(0, dtype=torch.float16)}
    save_streaming({"model": {"w": LazyTensor(w.shape, w.dtype, _blocks(w, 64)),
                              "v": LazyTensor(v.shape, v.dtype, _blocks(v, 333))}, **rest}, tmp_path / "s.pt")
    torch.save({"model": {"w": w, "v": v}, **rest}, tmp_path / "ref.pt")
    zs, zr = zipfile.ZipFile(tmp_path / "s.pt"), zipfile.ZipFile(tmp_path / "ref.pt")
    assert zs.testzip() is None                      # every record's CRC-32 is right
    assert zs.read("s/data.pkl") == zr.read("ref/data.pkl")
    assert [i.file_size for i in zs.infolist()] == [i.file_size for i in zr.infolist()]
    for mmap in (False, True):
        back = torch.load(tmp_path / "s.pt", weights_only=False, mmap=mmap)
        assert back["model"]["w"].dtype == torch.bfloat16
        assert raw_bytes(back["model"]["w"]) == raw_bytes(w)
        assert raw_bytes(back["model"]["v"]) == raw_bytes(v)
        assert raw_bytes(back["rng"]) == raw_bytes(rest["rng"])


def test_short_fill_is_an_error(tmp_path):
    t = torch.ones(10, 4)
    with pytest.raises(RuntimeError, match="expected 160"):
        save_streaming({"w": LazyTensor(t.shape, t.dtype, lambda write: write(t[:5]))}, tmp_path / "s.pt")


def test_row_blocks_cover_rows_within_limit_and_alignment():
    assert row_blocks(10, 100, 250) == [(0, 2), (2, 4), (4, 6), (6, 8), (8, 10)]
    assert row_blocks(10, 100, 250, align=3) == [(0, 3), (3, 6), (6, 9), (9, 10)]   # at least one aligned unit
    assert row_blocks(7, 100, 10_000) == [(0, 7)]
    assert row_blocks(5, 1000, 10) == [(0, 1), (1, 2), (2, 3), (3, 4), (4, 5)]    # a row over the limit: one row


def test_sub_piece_maps_rows_to_the_global_box():
    # local rows 4..8 of a piece at global rows 100.., columns 20..30, with a leading expert axis
    p = Piece(Box((4, 0), (4, 10)), "a", Box((2, 100, 20), (1, 4, 10)))
    assert sub_piece(p, Box((0, 0), (5, 10))) == (Box((4, 0), (1, 10)), Box((2, 100, 20), (1, 1, 10)))
    assert sub_piece(p, Box((6, 0), (10, 10))) == (Box((6, 0), (2, 10)), Box((2, 102, 20), (1, 2, 10)))
    assert sub_piece(p, Box((0, 0), (4, 10))) is None


def test_parse_size():
    assert parse_size("512M") == 512 << 20
    assert parse_size("1.5GiB") == 3 << 29
    assert parse_size("4096") == 4096


def _peaks(proc: subprocess.Popen) -> dict[int, tuple[str, int]]:
    """pid -> (role, peak RSS) of the process and its descendants; role "worker" for a forked worker
    (named ckptctl-wN by launch.py), else "main". Polled until the process ends (VmHWM is a high-water mark)."""
    psutil = pytest.importorskip("psutil")
    root, peaks = psutil.Process(proc.pid), {}
    while proc.poll() is None:
        try:
            procs = [root] + root.children(recursive=True)
        except psutil.Error:
            procs = []
        for q in procs:
            try:
                with open(f"/proc/{q.pid}/comm") as f:
                    role = "worker" if f.read().startswith("ckptctl-w") else "main"
                with open(f"/proc/{q.pid}/status") as f:
                    hwm = next(int(x.split()[1]) << 10 for x in f if x.startswith("VmHWM"))
                old = peaks.get(q.pid, ("main", 0))
                peaks[q.pid] = ("worker" if "worker" in (role, old[0]) else "main", max(old[1], hwm))
            except (psutil.Error, OSError, StopIteration):
                pass
        time.sleep(0.02)
    return peaks

def _convert_under(src, dst, to: str, budget: int, margin: float) -> None:
    """`convert SRC DST --to TO --nproc 2 --max-memory BUDGET`: exit 0, and the CLI and both workers peak
    within the budget + margin."""
    proc = subprocess.Popen([sys.executable, "-m", "ckptctl", "convert", str(src), str(dst), "--to", to,
                             "--nproc", "2", "--max-memory", str(budget), "--json"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    peaks = _peaks(proc)
    _, err = proc.communicate()
    assert proc.returncode == 0, err.decode()[-800:]
    assert sorted(role for role, _ in peaks.values()) == ["main", "worker", "worker"], peaks
    for pid, (role, peak) in peaks.items():
        assert peak <= budget * (1 + margin), f"{role} {pid} peaked at {peak >> 20} MiB > {budget >> 20} MiB + {margin:.0%}"



def test_workers_stay_under_the_budget_with_a_tensor_larger_than_it(tmp_path, cli):
    budget = 384 << 20
    margin = 0.10     # stated margin: 10 % of the budget for allocator slack and page rounding
    src, dst = tmp_path / "src", tmp_path / "dst"
    # A tied embedding of 100352 x 1024 fp32 = 411 MB: larger than the whole budget.
    r = cli("example", "gpt", "--layout", "tp2pp1", "--vocab", "100000", "--hidden", "1024", "--heads", "8",
            "--ffn", "256", "--layers", "2", "--tied", "--optimizer", "none", "--out", src)
    assert r.code == 0, r.err
    emb = 100352 * 1024 * 4
    assert emb > budget
    _convert_under(src, dst, "tp1pp1", budget, margin)   # the CLI holds no tensor data: under the budget too
    # verify compares the two global embeddings (411 MB each side) box by box under the same budget
    proc = subprocess.Popen([sys.executable, "-m", "ckptctl", "verify", str(src), str(dst), "--max-memory", str(budget),
                             "--json"], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    peaks = _peaks(proc)
    out, err = proc.communicate()
    assert proc.returncode == 0, err.decode()[-800:]
    rep = json.loads(out)
    assert rep["ok"] and rep["bytes_compared"] >= emb
    ((role, peak),) = peaks.values()
    assert peak <= budget * (1 + margin), f"verify peaked at {peak >> 20} MiB > {budget >> 20} MiB + 10 %"


def test_workers_stay_under_the_budget_with_a_distrib_optim_larger_than_it(tmp_path, cli):
    """The source side's distributed-optimizer state is written in row blocks, the pages of distrib_optim.pt
    dropped after each: before, a worker kept every page of the file it decoded (1195 MiB here)."""
    budget = 384 << 20
    src, dst = tmp_path / "src", tmp_path / "dst"
    r = cli("example", "gpt", "--layout", "tp4pp1dp2", "--vocab", "144000", "--hidden", "512", "--heads", "8",
            "--ffn", "256", "--layers", "2", "--optimizer", "distributed", "--out", src)
    assert r.code == 0, r.err
    sizes = [f.stat().st_size for f in src.rglob("distrib_optim.pt")]
    assert len(sizes) == 4 and min(sizes) > budget
    _convert_under(src, dst, "tp2pp1", budget, 0.10)
    assert len(list(dst.rglob("distrib_optim.pt"))) == 2


def test_verify_in_boxes_finds_the_same_first_difference(tmp_path):
    """compare_regions with boxes of a few elements reports what one whole-tensor comparison reports."""
    from ckptctl.verify_gather import VerifyReport, compare_arrays, compare_regions
    g = torch.Generator().manual_seed(1)
    a = torch.randn(7, 5, 3, generator=g).to(torch.bfloat16)
    b = a.clone()
    b[3, 2, 1] = -b[3, 2, 1] if float(b[3, 2, 1]) != 0 else 1.0
    b[6, 4, 2] += 1
    whole, boxed = VerifyReport("a", "b", "x", "y"), VerifyReport("a", "b", "x", "y")
    compare_arrays("model/w", a, b, False, whole)
    compare_regions("model/w", lambda bx: a[bx.slices], lambda bx: b[bx.slices], (a.shape, a.dtype),
                    (b.shape, b.dtype), False, boxed, limit=4)   # 4 bytes: two elements per box
    assert whole.differences == boxed.differences
    d = boxed.differences[0]
    assert (d.count, d.first_nd_index, d.first_index) == (2, [3, 2, 1], 3 * 15 + 2 * 3 + 1)
    # vocab rows: the target's extra rows must be zero, checked box by box as well
    v = torch.zeros(6, 4, dtype=torch.float16)
    vb = torch.zeros(8, 4, dtype=torch.float16)
    vb[7, 3] = 1
    rep = VerifyReport("a", "b", "x", "y")
    compare_regions("model/e", lambda bx: v[bx.slices], lambda bx: vb[bx.slices], (v.shape, v.dtype),
                    (vb.shape, vb.dtype), True, rep, limit=8)
    assert [x.reason for x in rep.differences] == ["padding rows added by the target are not zero"]
