"""Parameter order never comes from a file's key order (issue 10).

megatron-core's fully parallel save merges the ranks' write plans, so the key order of `.metadata` follows the
DP ranks' shares, not the model. A source whose `.metadata` key order is shuffled on purpose must convert to
byte-identical output; ckptctl derives the order of the DDP buffers from the model (ckptctl/optstate/order.py).
No megatron-core needed.
"""
from __future__ import annotations

import pickle
import random
import shutil

import pytest
import torch

from conftest import load, raw_bytes, run_cli

FORMS = [("distributed", "dp_reshardable", "float32"), ("distributed", "fully_reshardable", "bfloat16"),
         ("adam", None, "bfloat16")]


def shuffle_metadata(root, out, seed: int) -> None:
    """Copy a torch_dist checkpoint with its `.metadata` entries in a random order (same chunks, same bytes)."""
    shutil.copytree(root, out)
    md_path = next(out.glob("iter_*/.metadata"))
    with open(md_path, "rb") as f:
        md = pickle.load(f)
    items = list(md.state_dict_metadata.items())
    random.Random(seed).shuffle(items)
    md.state_dict_metadata = dict(items)
    st = list(md.storage_data.items())
    random.Random(seed + 1).shuffle(st)
    md.storage_data = dict(st)
    with open(md_path, "wb") as f:
        pickle.dump(md, f)


def tensors_of(obj, path=""):
    """Every tensor of a nested state (dict order kept): [(path, tensor)]."""
    if torch.is_tensor(obj):
        return [(path, obj)]
    if isinstance(obj, dict):
        return [x for k, v in obj.items() for x in tensors_of(v, f"{path}/{k}")]
    if isinstance(obj, (list, tuple)):
        return [x for i, v in enumerate(obj) for x in tensors_of(v, f"{path}/{i}")]
    return []


def optimizer_tensors(root) -> dict:
    out = {}
    for f in sorted(root.glob("iter_*/*/*.pt")):
        sd = load(f)
        part = sd if f.name == "distrib_optim.pt" else {"optimizer": sd.get("optimizer"),
                                                          "order": list(sd.get("model", {}))}
        for k, t in tensors_of(part):
            out[f"{f.parent.name}/{f.name}{k}"] = raw_bytes(t.reshape(-1))
        if f.name != "distrib_optim.pt":
            out[f"{f.parent.name}/model-order"] = repr(part["order"]).encode()
    return out


@pytest.mark.parametrize("kind,sharding,dtype", FORMS)
def test_shuffled_metadata_converts_identically(tmp_path, kind, sharding, dtype):
    opts = ["--swiglu", "--groups", "2", "--layers", "2", "--optimizer", kind, "--dtype", dtype]
    src = tmp_path / "src"
    assert run_cli("example", "gpt", "--layout", "tp2pp1dp2", "--out", tmp_path / "leg", *opts).code == 0
    extra = ["--optim-sharding", sharding] if sharding else []
    r = run_cli("convert", tmp_path / "leg", src, "--to", "tp2pp1dp2", "--to-format", "torch_dist", "--nproc", "0",
                *extra)
    assert r.code == 0, r.err
    shuffle_metadata(src, tmp_path / "shuf", 7)
    outs = {}
    for name in ("src", "shuf"):
        r = run_cli("convert", tmp_path / name, tmp_path / f"{name}_leg", "--to", "tp1pp2dp2", "--to-format", "legacy",
                    "--nproc", "0")
        assert r.code == 0, r.err
        outs[name] = optimizer_tensors(tmp_path / f"{name}_leg")
    r = run_cli("convert", tmp_path / "leg", tmp_path / "direct", "--to", "tp1pp2dp2", "--nproc", "0")
    assert r.code == 0, r.err
    bad = wrong_state(tmp_path / "direct", tmp_path / "shuf_leg")
    assert not bad, f"{len(bad)} optimizer tensors differ from the direct conversion, first {bad[:3]}"
    a, b = outs["src"], outs["shuf"]
    assert a.keys() == b.keys() and len(a) >= 6
    wrong = sorted(k for k in a if a[k] != b[k])
    assert not wrong, f"{len(wrong)} of {len(a)} optimizer entries differ, first {wrong[:3]}"
    # and both equal the legacy source's state converted directly, byte for byte and in the same order
    direct = optimizer_tensors(tmp_path / "direct")
    wrong = sorted(k for k in a if direct.get(k) != b[k])
    assert not wrong, f"{len(wrong)} of {len(a)} optimizer entries differ from the direct conversion, first {wrong[:3]}"
    v = run_cli("verify", tmp_path / "shuf", tmp_path / "shuf_leg")
    assert v.code == 0, v.out


def wrong_state(direct, other) -> list[str]:
    """verify (legacy against legacy: no torch_dist decoding involved) of the direct conversion against another."""
    v = run_cli("verify", direct, other, "--json")
    assert v.code in (0, 1), v.out + v.err
    return sorted({d["key"] for d in v.json()["differences"] if d["key"].startswith("optim")})
