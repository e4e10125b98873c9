"""More workers than target rank files (issue 13, ckptctl.formats.legacy.parallel_write): workers share a
file's records (owner writes the zip skeleton, every worker pwrites its parts, the owner patches the CRCs).
The files are byte-identical to those one worker writes, for GPT and MoE, with and without optimizer
state, from legacy and torch_dist sources; torch.load reads them (the CLI tests load converted files)."""
import zipfile
from pathlib import Path

import pytest
import torch

import ckptctl.formats.legacy.parallel_write as pw
from ckptctl.convert import convert
from ckptctl.example import example
from ckptctl.layout import parse_layout

SMALL = {"layers": 2, "hidden": 32, "ffn": 64, "heads": 4, "vocab": 64}
# (family, source layout, target layout, source format, optimizer)
CASES = [("gpt", "tp2pp2", "tp2pp1", None, "adam"), ("gpt", "tp2pp2", "tp1pp1", None, "none"),
         ("gpt", "tp2pp1", "tp1pp2", "torch_dist", "none"), ("moe", "tp2pp1ep2", "tp1pp1ep1", None, "adam"),
         ("moe", "tp2pp1ep2", "tp2pp1ep1", None, "none")]


def tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("family,layout,to,fmt,optim", CASES, ids=[f"{c[0]}-{c[2]}-{c[3] or 'legacy'}-{c[4]}" for c in CASES])
def test_shared_files_are_byte_identical_to_one_worker(tmp_path, monkeypatch, family, layout, to, fmt, optim):
    src = tmp_path / "src"
    example(family, parse_layout(layout), src, dict(SMALL), optimizer=optim, fmt=fmt)
    # parts of a few hundred bytes: records are cut in row ranges and spread over every worker
    monkeypatch.setattr(pw, "MIN_PART", 256)
    monkeypatch.setattr(pw, "PARTS_PER_WORKER", 64)
    log, parts = tmp_path / "parts.log", pw._parts

    def counted(*a):   # runs in the forked workers: reports through a file
        out = parts(*a)
        with open(log, "a") as f:
            f.write(f"{max(sum(1 for q in out if q[:2] == p[:2]) for p in out)}\n")   # parts of the most cut record
        return out
    monkeypatch.setattr(pw, "_parts", counted)
    one = convert(src, tmp_path / "one", parse_layout(to), nproc=1, to_format="legacy")
    files = max(len(parse_layout(layout).model_files), len(parse_layout(to).model_files))
    many = convert(src, tmp_path / "many", parse_layout(to), nproc=5, to_format="legacy")
    assert many.workers == 5 > files and one.workers == 1
    assert max(map(int, log.read_text().split())) > 1   # records were cut in several parts
    a, b = tree(tmp_path / "one"), tree(tmp_path / "many")
    assert a.keys() == b.keys() and any(k.endswith("model_optim_rng.pt") for k in a)
    assert [k for k in a if a[k] != b[k]] == []
    for k in a:
        if k.endswith(".pt"):
            with zipfile.ZipFile(tmp_path / "many" / k) as z:
                assert z.testzip() is None   # every record's CRC-32 matches its bytes
            torch.load(tmp_path / "many" / k, weights_only=False, mmap=True)


def test_profile_spans_put_every_worker_and_its_parts_on_one_time_line(tmp_path, monkeypatch):
    """CKPTCTL_PROFILE=DIR: DIR/phases.jsonl holds each worker's source and target spans, each worker's parts
    (with their bytes, which together are the files' tensor records) inside its target span, and the CLI's
    span of the workers around them all (docs/performance.md reads time lines from it)."""
    import json
    src = tmp_path / "src"
    example("gpt", parse_layout("tp2pp2"), src, dict(SMALL))
    monkeypatch.setattr(pw, "MIN_PART", 256)
    monkeypatch.setenv("CKPTCTL_PROFILE", str(tmp_path / "prof"))
    convert(src, tmp_path / "out", parse_layout("tp2pp1"), nproc=5, to_format="legacy")
    rows = [json.loads(line) for line in (tmp_path / "prof" / "phases.jsonl").read_text().splitlines()]
    assert all(r["start"] <= r["end"] for r in rows)
    span = {(r["rank"], r["phase"]): r for r in rows if ":" not in r["phase"]}
    assert {k for k in span} == {(w, p) for w in range(5) for p in ("source", "target")} | {("cli", "workers")}
    parts = [r for r in rows if r["phase"].startswith("target:parts:")]
    assert sorted(r["rank"] for r in parts) == list(range(5))
    for r in parts:
        t = span[(r["rank"], "target")]
        assert span[("cli", "workers")]["start"] <= t["start"] <= r["start"] <= r["end"] <= t["end"]
    records = 0
    for f in (tmp_path / "out").rglob("model_optim_rng.pt"):
        with zipfile.ZipFile(f) as z:
            records += sum(i.file_size for i in z.infolist() if "/data/" in i.filename)
    assert 0 < sum(int(r["phase"].rsplit(":", 1)[1]) for r in parts) <= records
