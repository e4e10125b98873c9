"""Store reads and writes chunk files directly; zarr-python must read the same bytes back, and the
direct path must read what zarr-python wrote (the chunk files stay a valid Zarr v3 group)."""
import json
import os
import random

import numpy as np
import pytest
import torch
import zarr

from ckptctl.box import Box
import ckptctl.store as store_mod
from ckptctl.store import Store, storage_dtype

DTYPES = [torch.bfloat16, torch.float32, torch.int64, torch.bool, torch.float16, torch.uint8]


def raw(t) -> bytes:
    if not torch.is_tensor(t):
        return np.ascontiguousarray(t).reshape(-1).view(np.uint8).tobytes()
    return t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def rand(shape, dtype, g) -> torch.Tensor:
    """Random bytes (every bit pattern, NaNs included) viewed as `dtype`; bool as 0/1."""
    if dtype == torch.bool:
        return torch.randint(0, 2, shape, generator=g).bool()
    n = int(np.prod(shape)) * torch.empty((), dtype=dtype).element_size()
    return torch.randint(0, 256, (n,), dtype=torch.uint8, generator=g).view(dtype).reshape(shape)


def tiles(shape, step):
    """Disjoint boxes covering `shape`, each `step` (clipped) along every dim."""
    import itertools
    for start in itertools.product(*[range(0, n, s) for n, s in zip(shape, step)]):
        yield Box(tuple(start), tuple(min(s, n - o) for o, s, n in zip(start, step, shape)))


def case(seed):
    rng = random.Random(seed)
    ndim = rng.choice([0, 1, 2, 2, 3])
    shape = tuple(rng.randint(1, 9) for _ in range(ndim))
    chunks = tuple(rng.randint(1, n) for n in shape)
    # writer boxes: whole chunks (sometimes several), so the last one is an edge chunk
    step = tuple(c * rng.randint(1, 2) for c in chunks)
    return shape, chunks, step, DTYPES[seed % len(DTYPES)]


@pytest.mark.parametrize("mmap_min", [1 << 20, 0])   # 0: every chunk through a memory map
@pytest.mark.parametrize("seed", range(12))
def test_direct_write_matches_zarr(tmp_path, seed, mmap_min, monkeypatch):
    monkeypatch.setattr(store_mod, "_MMAP_MIN", mmap_min)
    shape, chunks, step, dtype = case(seed)
    g = torch.Generator().manual_seed(seed)
    full = rand(shape, dtype, g)
    name = "model/x"
    st = Store.create(tmp_path / "s.zarr", {name: {"shape": list(shape), "dtype": str(dtype)[6:],
                                                    "chunks": list(chunks)}}, {"format": "ckptctl-store"})
    for b in tiles(shape, step):
        st.write(name, b, full[b.slices].clone())
    st2 = Store.open(tmp_path / "s.zarr")
    assert st2.complete(name)
    assert raw(st2.read(name, Box.full(shape))) == raw(full)
    z = zarr.open_array(str(tmp_path / "s.zarr" / "model" / "x"), mode="r")
    assert raw(z[...]) == raw(full.view(torch.uint16) if dtype == torch.bfloat16 else full)
    # arbitrary boxes, chunk-crossing, read both ways
    rng = random.Random(seed)
    for _ in range(6):
        offs = tuple(rng.randint(0, n - 1) for n in shape)
        sizes = tuple(rng.randint(1, n - o) for o, n in zip(offs, shape))
        b = Box(offs, sizes)
        got = st2.read(name, b)
        assert got.dtype == dtype and tuple(got.shape) == sizes
        assert raw(got) == raw(full[b.slices])
        assert raw(z[b.slices]) == raw(got.view(torch.uint16) if dtype == torch.bfloat16 else got)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.int64, torch.bool])
def test_zarr_written_read_direct(tmp_path, dtype):
    """A store whose chunks zarr-python wrote (edge chunks; a missing chunk is an error, never zeros)."""
    shape, chunks = (7, 5), (3, 2)
    g = torch.Generator().manual_seed(1)
    full = rand(shape, dtype, g)
    st = Store.create(tmp_path / "s.zarr", {"a": {"shape": list(shape), "dtype": str(dtype)[6:], "chunks": list(chunks)},
                                            "s": {"shape": [], "dtype": str(dtype)[6:], "chunks": []}},
                      {"format": "ckptctl-store"})
    sd = storage_dtype(str(dtype)[6:])
    arr = full.view(torch.uint16).numpy() if dtype == torch.bfloat16 else full.numpy()
    z = zarr.open_array(str(tmp_path / "s.zarr" / "a"), mode="r+")
    z[:6, :] = arr[:6]          # rows 6.. (chunk row 2) never written: no chunk files there
    zarr.open_array(str(tmp_path / "s.zarr" / "s"), mode="r+")[...] = arr[2, 3]
    assert not os.path.exists(tmp_path / "s.zarr" / "a" / "c" / "2" / "0")
    st = Store.open(tmp_path / "s.zarr")
    assert st.array("a").raw and st.array("a").crc    # zarr wrote our codec chain: the direct path reads it
    got = st.read("a", Box((0, 0), (6, 5)))
    assert raw(got) == raw(full[:6]) and got.dtype == dtype
    assert raw(st.read("a", Box((2, 1), (4, 3)))) == raw(full[2:6, 1:4])
    from ckptctl.errors import BadInput
    with pytest.raises(BadInput, match=r"array 'a' chunk 2\.0 is missing"):
        st.read("a", Box((2, 1), (5, 3)))
    assert raw(st.read("s", Box((), ()))) == raw(full[2, 3].reshape(()))
    assert str(np.dtype(sd)) == str(z.dtype)
    assert st.array("a").nchunks_initialized == 6 and st.array("a").nchunks == 9 and not st.complete("a")


def test_partial_chunk_write(tmp_path):
    """Boxes that cover chunks only partly (read-modify-write), in any order, end up like zarr's."""
    shape, chunks = (10, 6), (4, 4)
    g = torch.Generator().manual_seed(2)
    full = rand(shape, torch.float32, g)
    spec = {"a": {"shape": list(shape), "dtype": "float32", "chunks": list(chunks)}}
    st = Store.create(tmp_path / "s.zarr", spec, {"format": "ckptctl-store"})
    boxes = list(tiles(shape, (3, 5)))
    random.Random(0).shuffle(boxes)
    for b in boxes:
        st.write("a", b, full[b.slices].clone())
    st.write("a", Box((9, 5), (1, 1)), torch.tensor([[1.5]]))   # overwrite one element
    want = full.clone()
    want[9, 5] = 1.5
    assert raw(Store.open(tmp_path / "s.zarr").read("a", Box.full(shape))) == raw(want)
    assert raw(zarr.open_array(str(tmp_path / "s.zarr" / "a"), mode="r")[...]) == raw(want)
    # zero-size box and zero-size array are no-ops
    st.write("a", Box((3, 0), (0, 6)), torch.empty(0, 6))
    st2 = Store.create(tmp_path / "e.zarr", {"e": {"shape": [0, 4], "dtype": "float16", "chunks": [1, 4]}}, {})
    st2.write("e", Box((0, 0), (0, 4)), torch.empty(0, 4, dtype=torch.float16))
    assert tuple(st2.read("e", Box((0, 0), (0, 4))).shape) == (0, 4) and st2.complete("e")


def test_array_info_and_errors(tmp_path):
    from ckptctl.errors import BadInput
    st = Store.create(tmp_path / "s.zarr", {"m/w": {"shape": [6, 4], "dtype": "bfloat16", "chunks": [2, 4]}},
                      {"format": "ckptctl-store", "complete": False})
    st.set_attrs({"complete": True})
    st = Store.open(tmp_path / "s.zarr")
    a = st.array("m/w")
    assert (a.shape, a.chunks, a.attrs["torch_dtype"], a.nchunks, a.nchunks_initialized) == ((6, 4), (2, 4), "bfloat16", 3, 0)
    assert st.attrs == {"format": "ckptctl-store", "complete": True}
    assert dict(zarr.open_group(str(tmp_path / "s.zarr"), mode="r").attrs) == st.attrs
    with pytest.raises(BadInput, match="no array 'm/x'"):
        st.array("m/x")
    with pytest.raises(IndexError):
        st.read("m/w", Box((5, 0), (2, 4)))
    (tmp_path / "s.zarr" / "m" / "w" / "c" / "0").mkdir(parents=True)
    (tmp_path / "s.zarr" / "m" / "w" / "c" / "0" / "0").write_bytes(b"\0" * 3)
    with pytest.raises(BadInput, match="array 'm/w' chunk 0.0: chunk file .* not 20 bytes"):
        st.read("m/w", Box((0, 0), (2, 4)))
    with pytest.raises(BadInput, match="not a ckptctl Zarr store"):
        Store.open(tmp_path / "nothing")


def test_non_raw_array_goes_through_zarr(tmp_path):
    """An array with a compressor (not made by ckptctl) is still read and written, through zarr."""
    Store.create(tmp_path / "s.zarr", {}, {"format": "ckptctl-store"})
    g = zarr.open_group(str(tmp_path / "s.zarr"), mode="r+")
    g.create_array("c", shape=(5, 3), dtype="float32", chunks=(2, 3), attributes={"torch_dtype": "float32"})
    st = Store.open(tmp_path / "s.zarr", mode="r+")
    assert not st.array("c").raw
    x = torch.arange(15, dtype=torch.float32).reshape(5, 3)
    st.write("c", Box((0, 0), (5, 3)), x)
    assert raw(st.read("c", Box((1, 1), (3, 2)))) == raw(x[1:4, 1:3])


@pytest.mark.parametrize("mmap_min", [1 << 20, 0])
def test_crc32c_checked_by_us_and_by_zarr(tmp_path, mmap_min, monkeypatch):
    """Every chunk ends in zarr's crc32c: plain zarr-python reads the store identically, and a flipped
    byte (data or checksum) is caught by both readers, naming array and chunk on ours."""
    from ckptctl.errors import BadInput
    monkeypatch.setattr(store_mod, "_MMAP_MIN", mmap_min)
    shape, chunks = (9, 6), (4, 6)
    full = rand(shape, torch.bfloat16, torch.Generator().manual_seed(3))
    st = Store.create(tmp_path / "s.zarr", {"m/w": {"shape": list(shape), "dtype": "bfloat16", "chunks": list(chunks)}},
                      {"format": "ckptctl-store"})
    for b in tiles(shape, chunks):
        st.write("m/w", b, full[b.slices].clone())
    meta = json.load(open(tmp_path / "s.zarr" / "m" / "w" / "zarr.json"))
    assert [c["name"] for c in meta["codecs"]] == ["bytes", "crc32c"]
    f = tmp_path / "s.zarr" / "m" / "w" / "c" / "1" / "0"
    assert f.stat().st_size == 4 * 6 * 2 + 4
    z = zarr.open_array(str(tmp_path / "s.zarr" / "m" / "w"), mode="r")
    assert raw(z[...]) == raw(full.view(torch.uint16))
    good = f.read_bytes()
    for pos in (5, len(good) - 1):                    # a data byte, a checksum byte
        b = bytearray(good)
        b[pos] ^= 1
        f.write_bytes(bytes(b))
        with pytest.raises(BadInput, match=r"array 'm/w' chunk 1\.0 fails its crc32c checksum"):
            Store.open(tmp_path / "s.zarr").read("m/w", Box((3, 0), (3, 6)))
        with pytest.raises(ValueError, match="checksum"):
            zarr.open_array(str(tmp_path / "s.zarr" / "m" / "w"), mode="r")[...]
    f.write_bytes(good)
    f.unlink()
    with pytest.raises(BadInput, match=r"array 'm/w' chunk 1\.0 is missing"):
        Store.open(tmp_path / "s.zarr").read("m/w", Box.full(shape))


def test_resumed_add_arrays_rewrites_torn_metadata(tmp_path):
    """Array metadata is written in place (not renamed into place): a crash can leave one torn. A resumed run
    (`existing_ok`) must write it again, keep whole ones, and zarr-python must then open every array."""
    specs = {f"m/w{i}": {"shape": [6, 4], "dtype": "bfloat16", "chunks": [2, 4]} for i in range(3)}
    st = Store.create(tmp_path / "s.zarr", specs, {"format": "ckptctl-store", "complete": False})
    whole = (tmp_path / "s.zarr" / "m" / "w1" / "zarr.json").read_text()
    (tmp_path / "s.zarr" / "m" / "w2" / "zarr.json").write_text(whole[: len(whole) // 2])   # torn by a crash
    kept = (tmp_path / "s.zarr" / "m" / "w0" / "zarr.json").stat().st_mtime_ns
    Store.open(tmp_path / "s.zarr", mode="r+").add_arrays(specs, existing_ok=True)
    assert (tmp_path / "s.zarr" / "m" / "w0" / "zarr.json").stat().st_mtime_ns == kept
    g = zarr.open_group(str(tmp_path / "s.zarr"), mode="r")
    for i in range(3):
        assert g[f"m/w{i}"].shape == (6, 4) and g[f"m/w{i}"].attrs["torch_dtype"] == "bfloat16"
    assert json.loads((tmp_path / "s.zarr" / "m" / "w2" / "zarr.json").read_text()) == json.loads(whole)
