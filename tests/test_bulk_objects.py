"""Objects in bulk (storage/bulk_objects.py): round trip through the store, plain zarr-python reads the rows
with the bytes torch.save wrote, the array metadata is what zarr writes itself, damage is named, an
oversized object falls back to its own array, and a convert of a MoE checkpoint keeps its objects in rows
and verifies equal."""
from __future__ import annotations

import io
import json
import random

import pytest
import torch
import zarr

from ckptctl.errors import BadInput
from ckptctl.storage import bulk_objects as bo
from ckptctl.storage.objects import get_object
from ckptctl.storage.pickles import dumps_bytes
from ckptctl.store import Store


def extra_state(n: int, seed: int):
    """An _extra_state as TransformerEngine saves it (a BytesIO of pickled fp8 metadata), or a tensor."""
    rnd = random.Random(seed)
    if seed % 3 == 0:
        return torch.tensor([rnd.random() for _ in range(n)])
    return io.BytesIO(bytes(rnd.randrange(256) for _ in range(n)))


def same(a, b) -> bool:
    if isinstance(a, io.BytesIO):
        return isinstance(b, io.BytesIO) and a.getvalue() == b.getvalue()
    if torch.is_tensor(a):
        return torch.is_tensor(b) and a.dtype == b.dtype and a.view(torch.uint8).numpy().tobytes() == b.view(torch.uint8).numpy().tobytes()
    return a == b


@pytest.fixture
def store(tmp_path):
    return Store.create(tmp_path / "s.zarr", {}, {"format": "ckptctl-store"})


def fill(store, rows=4, per_row=12):
    values, encs = {}, {}
    for r in range(rows):
        w = bo.ObjectRows(store, r, rows)
        for k in range(per_row):
            slot = f"decoder.layers.{k}.self_attention.core_attention._extra_state|{rows}|{r}"
            values[slot] = extra_state(17 + 31 * k, r * 100 + k)
            w.put(slot, values[slot])
        rng = {"random_rng_state": (3, tuple(range(10)), None), "torch_rng_state": torch.arange(8, dtype=torch.uint8)}
        values[f"rng@mp_rank_{r:02d}"] = rng
        w.put(f"rng@mp_rank_{r:02d}", rng)
        values[f"none{r}"] = None
        w.put(f"none{r}", None)
        encs.update(w.flush())
    return values, encs


def test_round_trip_in_rows(store):
    values, encs = fill(store)
    assert sum(e.startswith("row:") for e in encs.values()) == 4 * 13 and encs["none0"] == "none"
    assert len(encs) == len(values)
    fresh = Store.open(store.path)            # another process's view: nothing cached
    for _ in range(2):                        # the second time from the cached row: still equal (copies)
        check_all(fresh, values, encs)


def check_all(fresh, values, encs):
    for slot, v in values.items():
        got = get_object(fresh, slot, encs[slot])
        if isinstance(v, dict):
            assert got["random_rng_state"] == v["random_rng_state"] and same(got["torch_rng_state"], v["torch_rng_state"])
        else:
            assert same(got, v), slot
            if isinstance(got, io.BytesIO):
                got.read()                    # a consumer reading the buffer leaves the stored one as it was


def test_one_chunk_per_row_and_kind(store):
    fill(store)
    # two arrays (one per kind), one chunk file per row and kind: not one array per object
    chunk_files = sorted(p.relative_to(store.path).as_posix() for p in store.path.rglob("*") if p.is_file()
                         and p.parts[-1] != "zarr.json")
    assert chunk_files == sorted(f"objects_bulk/{k}/c.{r}.0" for k in ("extra", "rng") for r in range(4))


def test_plain_zarr_reads_the_rows(store):
    values, encs = fill(store, rows=3, per_row=5)
    g = zarr.open_group(str(store.path), mode="r")
    for slot, enc in encs.items():
        if enc == "none":
            continue
        _, kind, row, n = enc.split(":")
        arr = g[f"objects_bulk/{kind}"]
        assert arr.shape == (3, bo.CAP) and arr.dtype == "uint8"
        got = torch.load(io.BytesIO(arr[int(row), :int(n)].tobytes()), weights_only=False)[slot]
        assert dumps_bytes(got) == dumps_bytes(values[slot])


def test_a_row_over_several_chunks(store):
    w = bo.ObjectRows(store, 0, 2)
    big = torch.arange(bo.CHUNK // 2, dtype=torch.float32)          # 2 chunks' worth
    w.put("a._extra_state|1|0", big)
    encs = w.flush()
    assert int(encs["a._extra_state|1|0"].split(":")[-1]) > 2 * bo.CHUNK
    assert same(get_object(Store.open(store.path), "a._extra_state|1|0", encs["a._extra_state|1|0"]), big)
    g = zarr.open_group(str(store.path), mode="r")
    n = int(encs["a._extra_state|1|0"].split(":")[-1])
    assert same(torch.load(io.BytesIO(g["objects_bulk/extra"][0, :n].tobytes()))["a._extra_state|1|0"], big)


def test_metadata_is_what_zarr_writes(tmp_path):
    from zarr.codecs import Crc32cCodec, ZstdCodec
    g = zarr.open_group(str(tmp_path / "z.zarr"), mode="w", zarr_format=3)
    g.create_array("a", shape=(5, 1024), dtype="uint8", chunks=(1, 256), filters=None, fill_value=0,
                   chunk_key_encoding={"name": "default", "separator": "."},
                   compressors=[ZstdCodec(level=1), Crc32cCodec()])
    theirs = json.loads((tmp_path / "z.zarr" / "a" / "zarr.json").read_text())
    theirs["shape"], theirs["chunk_grid"]["configuration"]["chunk_shape"] = [5, bo.CAP], [1, bo.CHUNK]
    ours = bo.array_meta(5)
    assert {k: v for k, v in ours.items() if k != "attributes"} == {k: v for k, v in theirs.items() if k != "attributes"}


def test_damage_is_named(store):
    values, encs = fill(store, rows=2, per_row=2)
    slot = next(s for s, e in encs.items() if e.startswith("row:extra:1:"))
    chunk = store.path / "objects_bulk" / "extra" / "c.1.0"
    raw = bytearray(chunk.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    chunk.write_bytes(bytes(raw))
    with pytest.raises(BadInput, match=r"objects_bulk/extra row 1 chunk 0 fails its crc32c checksum"):
        get_object(Store.open(store.path), slot, encs[slot])
    chunk.unlink()
    with pytest.raises(BadInput, match=r"objects_bulk/extra row 1 chunk 0 is missing"):
        get_object(Store.open(store.path), slot, encs[slot])


def test_a_row_over_the_cap_is_refused(store, monkeypatch):
    monkeypatch.setattr(bo, "CAP", 4096)
    w = bo.ObjectRows(store, 3, 5)
    w.put("b._extra_state|1|0", torch.arange(2000, dtype=torch.float32))
    with pytest.raises(BadInput, match=r"objects of source unit 3: \d+ bytes of extra objects exceed 4096"):
        w.flush()


def test_convert_keeps_objects_in_rows_and_verifies_equal(cli, tmp_path):
    src, st, dst = tmp_path / "src", tmp_path / "st.zarr", tmp_path / "dst"
    assert cli("example", "moe", "--layout", "tp2pp2ep2", "--out", src).code == 0
    r = cli("convert", src, st)
    assert r.code == 0, r.err
    encs = json.loads((st / "zarr.json").read_text())["attributes"]["objects"]
    rows = [e for e in encs.values() if e.startswith("row:")]
    assert rows and all(e.startswith("row:") or e == "none" or k in ("common", "optimizer@common")
                        or k.startswith("__") for k, e in encs.items())
    assert not (st / "objects").exists() or len(list((st / "objects").iterdir())) <= 3   # common state only
    r = cli("convert", st, dst, "--to", "tp1pp2ep4etp1")
    assert r.code == 0, r.err
    r = cli("verify", src, dst)
    assert r.code == 0, r.out + r.err
