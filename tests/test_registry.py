"""The format registry (ckptctl/formats/registry.py): names, aliases, detection, refusals."""
from __future__ import annotations

import pytest

from ckptctl.errors import BadInput
from ckptctl.formats import registry
from ckptctl.formats.base import Format


def test_names_aliases_and_refusal():
    names = registry.names()
    assert {"legacy", "torch_dist"} <= set(names) and len(names) == len(set(names))
    assert registry.get("torch") is registry.get("legacy")           # Megatron-LM's name of the legacy format
    assert registry.canonical(" Torch ") == "legacy" and registry.canonical("nope") == "nope"
    assert registry.megatron_name("legacy") == "torch" and registry.megatron_name("torch_dist") == "torch_dist"
    with pytest.raises(BadInput, match="--to-format: expected one of .*legacy.*got 'nope'"):
        registry.get("nope", "--to-format")
    assert all(isinstance(f, Format) for f in registry.formats())
    assert registry.example_writer().writes_examples and registry.fallback().fallback


def test_detect(tmp_path, cli):
    for fmt in ("legacy", "torch_dist"):
        out = tmp_path / fmt
        r = cli("example", "gpt", "--layers", "2", "--hidden", "32", "--heads", "4", "--ffn", "64", "--vocab", "64",
                "--format", fmt, "--optimizer", "none", "--out", out, "--json")
        assert r.code == 0, r.out
        assert registry.detect(out).name == fmt
    assert registry.detect(tmp_path / "missing") is registry.fallback()   # its inspect names what is missing
