"""The reference-backed pivot (issue 13, ckptctl.storage.refs): a store whose chunks are byte ranges of the
source files gives the same target files as a self-contained store, for every family and both source
formats; plain zarr-python reads it through fsspec's reference filesystem; a source changed after the
source phase is refused naming the file; a direct convert (whose hidden store references) writes no copy."""
import json
import os
import pickle
from pathlib import Path

import fsspec
import pytest
import zarr
from zarr.storage import FsspecStore

from ckptctl.convert import convert, inspect
from ckptctl.errors import BadInput
from ckptctl.example import example
from ckptctl.layout import parse_layout
from ckptctl.reshard.run import Job, run_job
from ckptctl.storage.refs import REFS_FILE

# (family, source layout, target layout): TP and PP changed, experts moved between EP ranks
CASES = [("gpt", "tp2pp2", "tp1pp1"), ("bert", "tp2pp1", "tp1pp1"), ("t5", "tp2pp1", "tp1pp1"),
         ("mamba", "tp2pp2", "tp1pp1"), ("moe", "tp2pp1ep2", "tp1pp1ep1")]
SMALL = {"layers": 2, "hidden": 32, "ffn": 64, "heads": 4, "vocab": 64}


def source_store(src: Path, store: Path, refs: bool) -> None:
    """The source phase alone, in this process, into a store that is kept (`refs`: referencing)."""
    s = inspect(src)
    work = store.with_suffix(".work")
    work.mkdir()
    run_job(Job(workdir=str(work), store=str(store), family=s.family, cfg=s.cfg.to_json(), src=str(src),
                src_layout=s.layout.to_json(), inventories=s.inventories, iteration=s.ckpt.iteration,
                src_format=s.fmt, dist=s.dist, optim=s.optim, phases=("source",), refs=refs))


def chunk_files(store: Path) -> dict[str, int]:
    """Bytes of the chunk files of the model's arrays (what a store copied of the weights)."""
    # chunk keys are c/<i>/...; never a metadata file (nor zarr.json's temporary name while it is written)
    return {str(p.relative_to(store)): p.stat().st_size for p in (store / "model").rglob("*")
            if p.is_file() and "c" in p.relative_to(store).parts[:-1]}


def tree(root: Path) -> dict[str, bytes]:
    out = {}
    for p in sorted(root.rglob("*")):
        if p.is_file():
            data = p.read_bytes()
            if p.name == ".metadata":   # DCP's metadata names the run (a random save_id): compare the rest
                md = pickle.loads(data)
                data = pickle.dumps((md.state_dict_metadata, md.planner_data, md.storage_data))
            out[str(p.relative_to(root))] = data
    return out


@pytest.mark.parametrize("fmt", ["legacy", "torch_dist"])
@pytest.mark.parametrize("family,layout,to", CASES, ids=[c[0] for c in CASES])
def test_reference_and_materialized_stores_give_identical_targets(tmp_path, family, layout, to, fmt):
    src = tmp_path / "src"
    example(family, parse_layout(layout), src, dict(SMALL), fmt=None if fmt == "legacy" else fmt)
    stores = {}
    for refs in (True, False):
        stores[refs] = tmp_path / f"{'ref' if refs else 'mat'}.zarr"
        source_store(src, stores[refs], refs)
    copied, full = chunk_files(stores[True]), chunk_files(stores[False])
    # the referencing store copies no weight bytes: every chunk of these layouts is one source byte range
    assert (stores[True] / REFS_FILE).is_file() and full and sum(copied.values()) == 0, copied
    outs = {}
    for refs, st in stores.items():
        outs[refs] = tmp_path / f"out-{refs}"
        convert(st, outs[refs], parse_layout(to), nproc=0)
    a, b = tree(outs[True]), tree(outs[False])
    assert a.keys() == b.keys() and a
    assert [k for k in a if a[k] != b[k]] == []


def test_plain_zarr_reads_the_reference_store_as_the_materialized_one(tmp_path):
    src = tmp_path / "src"
    example("gpt", parse_layout("tp2pp2"), src, {**SMALL, "dtype": "bfloat16"})
    source_store(src, tmp_path / "ref.zarr", True)
    source_store(src, tmp_path / "mat.zarr", False)
    fs = fsspec.filesystem("reference", fo=str(tmp_path / "ref.zarr" / REFS_FILE), asynchronous=True)
    ref = zarr.open_group(FsspecStore(fs, read_only=True), mode="r")
    mat = zarr.open_group(str(tmp_path / "mat.zarr"), mode="r")
    names = [n for n, _ in mat.arrays()]   # none at the root: model/ and objects/
    seen = 0
    for group in ("model", "objects"):
        for name, arr in mat[group].arrays():
            got = ref[f"{group}/{name}"]
            assert got.shape == arr.shape and got.dtype == arr.dtype
            assert got[...].tobytes() == arr[...].tobytes(), name
            seen += 1
    assert seen == len(json.loads((tmp_path / "mat.zarr" / "zarr.json").read_text())["attributes"]["arrays"]) + \
        len(list(mat["objects"].arrays())) and not names
    assert dict(ref.attrs) == dict(mat.attrs)
    # the referencing store keeps its arrays' metadata in refs.json and one document per worker, not in a
    # folder and zarr.json each (issue 13: no per-array round trips the manifest makes unnecessary); only
    # the first array of each storage dtype (bf16 weights, fp32 optimizer state), which zarr-python creates,
    # has its own
    def on_disk(store):
        return [p for g in ("model", "optim") for p in (store / g).rglob("zarr.json")
                if json.loads(p.read_text())["node_type"] == "array"]
    assert len(on_disk(tmp_path / "ref.zarr")) == 2 and len(on_disk(tmp_path / "mat.zarr")) > 20


def test_source_changed_after_the_source_phase_is_refused_naming_the_file(tmp_path):
    src = tmp_path / "src"
    example("gpt", parse_layout("tp2pp1"), src, dict(SMALL), optimizer="none")
    store = tmp_path / "ref.zarr"
    source_store(src, store, True)
    refs = json.loads((store / REFS_FILE).read_text())
    key = next(k for k in refs["crc32c"] if "linear_fc1.weight" in k)
    path, off, n = refs["refs"][key]
    with open(path, "r+b") as f:   # one byte inside the referenced range flips (a training run saving over it)
        f.seek(off + n // 2)
        b = f.read(1)
        f.seek(off + n // 2)
        f.write(bytes([b[0] ^ 0xFF]))
    with pytest.raises(BadInput, match=rf"^{path}: bytes {off}\.\.{off + n} .*crc32c: the source file changed"):
        convert(store, tmp_path / "out", parse_layout("tp1pp1"), nproc=0)
    assert not (tmp_path / "out").exists()


def test_direct_convert_copies_no_weights_and_leaves_the_source_untouched(tmp_path, monkeypatch):
    """Through the CLI's convert with 2 workers: the hidden store is watched while the workers run."""
    import threading
    src = tmp_path / "src"
    example("gpt", parse_layout("tp2pp2"), src, {**SMALL, "layers": 4}, optimizer="none")
    before = {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in src.rglob("*") if p.is_file()}
    peak, seen, stop = [0], [0], threading.Event()

    def watch():   # the most weight bytes the hidden store ever holds as chunk files
        while not stop.is_set():
            for w in tmp_path.glob(".dst.ckptctl-*"):
                if (w / "store.zarr" / "model").is_dir():
                    try:
                        peak[0] = max(peak[0], sum(chunk_files(w / "store.zarr").values()))
                        seen[0] += 1
                    except OSError:   # removed while listed
                        pass
            stop.wait(0.005)
    t = threading.Thread(target=watch)
    t.start()
    try:
        convert(src, tmp_path / "dst", parse_layout("tp1pp1"), nproc=2)
    finally:
        stop.set()
        t.join()
    assert seen[0] and peak[0] == 0
    assert {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in src.rglob("*") if p.is_file()} == before
    assert not list(tmp_path.glob(".dst.ckptctl-*")) and (tmp_path / "dst").is_dir()
    # the target does not depend on the store: it is gone, and the result equals a self-contained run
    convert(src, tmp_path / "dst2", parse_layout("tp1pp1"), nproc=0, keep_store=True)
    assert not (tmp_path / "dst2.zarr" / REFS_FILE).exists() and chunk_files(tmp_path / "dst2.zarr")
    assert tree(tmp_path / "dst") == tree(tmp_path / "dst2")


def test_tensor_bytes_located_in_a_torch_file_and_in_an_embedded_blob(tmp_path):
    """Views into one shared buffer (as Megatron's parameters in its contiguous buffers are saved), a
    transposed view (not one range) and a blob of torch.save bytes inside a larger file (a .distcp)."""
    import io
    import torch
    from ckptctl.formats.legacy.offsets import RankFileLocator
    from ckptctl.formats.torch_dist.offsets import BlobLocator
    from ckptctl.storage.pickles import load_pt

    buf = torch.arange(64, dtype=torch.bfloat16)
    sd = {"a": buf[8:24].view(4, 4), "b": buf[40:], "c": torch.randn(3, 5), "t": torch.randn(5, 3).t()}
    path = tmp_path / "model_optim_rng.pt"
    torch.save(sd, path)
    got = load_pt(path)
    locate = RankFileLocator(path)
    raw = path.read_bytes()
    for k, t in got.items():
        where = locate(t)
        assert where is not None and where[0] == os.path.realpath(path), k
        off = where[1] + t.data_ptr() - t.untyped_storage().data_ptr()
        n = t.numel() * t.element_size()
        if t.is_contiguous():
            assert raw[off:off + n] == t.reshape(-1).view(torch.uint8).numpy().tobytes(), k
    assert not got["t"].is_contiguous()   # located (its storage is one entry), but never referenced as one range
    blob = io.BytesIO()
    torch.save(torch.randn(6, 7).to(torch.bfloat16), blob)
    data = b"\0" * 1000 + blob.getvalue() + b"tail"
    (tmp_path / "__0_0.distcp").write_bytes(data)
    x = torch.load(io.BytesIO(blob.getvalue()), weights_only=True)
    where = BlobLocator(tmp_path / "__0_0.distcp", 1000, len(blob.getvalue()))(x)
    assert where is not None and data[where[1]:where[1] + 84] == x.reshape(-1).view(torch.uint8).numpy().tobytes()


@pytest.mark.parametrize("map_min", [0, 1 << 40])   # 0: every chunk needed in part read through a memory map
def test_chunks_read_in_part_from_the_source(tmp_path, monkeypatch, map_min):
    """tp2 -> tp4 needs half of each source chunk per target file (and pp2 -> pp1 merges stages)."""
    from ckptctl.storage import refs as refs_mod
    monkeypatch.setattr(refs_mod, "_MAP_MIN", map_min)
    src = tmp_path / "src"
    example("gpt", parse_layout("tp2pp2"), src, {**SMALL, "dtype": "bfloat16"}, optimizer="none")
    for refs in (True, False):
        source_store(src, tmp_path / f"{refs}.zarr", refs)
        convert(tmp_path / f"{refs}.zarr", tmp_path / f"out-{refs}", parse_layout("tp4pp1"), nproc=0)
    assert tree(tmp_path / "out-True") == tree(tmp_path / "out-False")
