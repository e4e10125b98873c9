"""The contract every checkpoint format keeps (as zarr's `StoreTests`): a format's test class inherits
`FormatContract` and supplies raw helpers that read and damage its files without ckptctl's code, so the
checks do not trust the code under test.

    round trip A -> B -> A       every tensor's raw bytes identical (read by the raw helper), verify green
    truncated data file          convert exits 2 naming the file, nothing written
    unknown key                  refused (exit 2, the key named), never dropped
    one flipped byte             verify exits 1 naming the tensor

Checkpoints are tiny (2 layers, hidden 32) and made once per class.
"""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from tests.conftest import run_cli

TINY = ["--layers", "2", "--hidden", "32", "--heads", "4", "--ffn", "64", "--vocab", "64"]


class FormatContract:
    fmt: str = ""                 # the registry name of the format under test
    layout_a = "tp2pp1"
    layout_b = "tp1pp2"

    # --- raw helpers each format supplies (no ckptctl code) ---------------------------------------
    def raw_tensors(self, root: Path) -> dict[str, bytes]:
        """Every stored tensor's raw bytes, keyed by where it is stored."""
        raise NotImplementedError

    def data_files(self, root: Path) -> list[Path]:
        """The files that hold tensor bytes."""
        raise NotImplementedError

    def add_unknown_key(self, root: Path) -> str:
        """Make the checkpoint hold a tensor under a name no model has; returns that name."""
        raise NotImplementedError

    def flip_byte(self, root: Path) -> str:
        """Flip one bit of one stored weight in place; returns the tensor's global name."""
        raise NotImplementedError

    # --- the checkpoints, made once ---------------------------------------------------------------
    @pytest.fixture(scope="class")
    def ckpts(self, tmp_path_factory) -> dict[str, Path]:
        d = tmp_path_factory.mktemp(f"contract-{self.fmt}")
        a, b, back = d / "a", d / "b", d / "back"
        r = run_cli("example", "gpt", "--layout", self.layout_a, *TINY, "--format", self.fmt, "--out", a, "--json")
        assert r.code == 0, r.out + r.err
        for src, dst, lay in ((a, b, self.layout_b), (b, back, self.layout_a)):
            r = run_cli("convert", src, dst, "--to", lay, "--to-format", self.fmt, "--nproc", "0", "--json")
            assert r.code == 0, r.out + r.err
        return {"a": a, "b": b, "back": back}

    # --- the contract -----------------------------------------------------------------------------
    def test_registered_and_detected(self, ckpts):
        from ckptctl.formats import registry
        fmt = registry.get(self.fmt)
        assert fmt.name == self.fmt and registry.detect(ckpts["a"]) is fmt and registry.detect(ckpts["b"]) is fmt

    def test_round_trip_is_byte_identical(self, ckpts):
        before, after = self.raw_tensors(ckpts["a"]), self.raw_tensors(ckpts["back"])
        assert before and sorted(before) == sorted(after)
        assert [k for k in before if before[k] != after[k]] == []
        assert self.raw_tensors(ckpts["b"]).keys() != before.keys()      # B really is another layout
        v = run_cli("verify", ckpts["a"], ckpts["back"], "--json")
        assert v.code == 0 and v.json()["ok"], v.out

    def test_truncated_file_is_refused(self, ckpts, tmp_path):
        bad = tmp_path / "bad"
        shutil.copytree(ckpts["a"], bad)
        f = max(self.data_files(bad), key=lambda p: p.stat().st_size)
        f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
        r = run_cli("convert", bad, tmp_path / "out", "--to", self.layout_b, "--nproc", "0", "--json")
        assert r.code == 2, r.out + r.err
        assert f.name in r.out + r.err and not (tmp_path / "out").exists()

    def test_unknown_key_is_refused(self, ckpts, tmp_path):
        bad = tmp_path / "bad"
        shutil.copytree(ckpts["a"], bad)
        name = self.add_unknown_key(bad)
        r = run_cli("convert", bad, tmp_path / "out", "--to", self.layout_b, "--nproc", "0", "--json")
        assert r.code == 2 and name.split(".")[-2] in r.out + r.err, r.out + r.err
        assert not (tmp_path / "out").exists()

    def test_flipped_byte_is_found_by_verify(self, ckpts, tmp_path):
        bad = tmp_path / "bad"
        shutil.copytree(ckpts["a"], bad)
        key = self.flip_byte(bad)
        v = run_cli("verify", ckpts["a"], bad, "--json")
        assert v.code == 1, v.out + v.err
        assert [d for d in v.json()["differences"] if d["key"] == key and d["count"] == 1], v.out
