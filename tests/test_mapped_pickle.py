"""Rank files through the C unpickler (`storage/mapped_pickle.py`, issue 13 start-up): the object equals
torch.load(weights_only=True, mmap=True)'s on every kind of legacy example, tensors byte for byte with the
same views, sharing and file mapping; what it cannot read or refuses goes to torch.load, which gives the
verdict; no global off the list is ever called."""
import argparse
import collections
import fractions
import io
import os
import pickle
import zipfile

import numpy as np
import pytest
import torch

from ckptctl.errors import BadInput
from ckptctl.example import example
from ckptctl.formats.legacy.offsets import RankFileLocator
from ckptctl.layout import parse_layout
from ckptctl.storage import mapped_pickle, pickles

CASES = {   # name -> (family, layout, opts, optimizer)
    "gpt_adam": ("gpt", "tp2pp2", {"layers": 4}, "adam"),
    "gpt_distopt": ("gpt", "tp2pp1dp2", {"layers": 2}, "distributed"),
    "gpt_bf16_vpp": ("gpt", "tp2pp2vpp2", {"layers": 4, "dtype": "bfloat16", "groups": 2, "swiglu": True}, "adam"),
    "moe_ep2": ("moe", "tp1pp1ep2", {"layers": 2}, "adam"),
    "mamba": ("mamba", "tp2pp1", {}, "none"),
}


def _torch_load(path):
    return pickles._weights_only_load(path, str(path), True)


def _same(a, b, where="", shared=None):
    """a (mapped) equals b (torch.load): types, containers, tensors' dtype/shape/stride/offset/bytes."""
    assert type(a) is type(b), (where, type(a), type(b))
    if isinstance(a, torch.Tensor):
        assert (a.dtype, a.shape, a.stride(), a.storage_offset(), a.requires_grad) == \
            (b.dtype, b.shape, b.stride(), b.storage_offset(), b.requires_grad), where
        sa, sb = a.untyped_storage(), b.untyped_storage()
        assert sa.nbytes() == sb.nbytes() and bytes(sa) == bytes(sb), where
        # tensors that share a storage under torch.load share one here, and only those
        assert shared.setdefault(("a", sa.data_ptr()), sb.data_ptr()) == sb.data_ptr(), where
        assert shared.setdefault(("b", sb.data_ptr()), sa.data_ptr()) == sa.data_ptr(), where
    elif isinstance(a, dict):
        assert list(a) == list(b), where
        for k in a:
            _same(a[k], b[k], f"{where}/{k}", shared)
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            _same(x, y, f"{where}[{i}]", shared)
    elif isinstance(a, argparse.Namespace):
        _same(vars(a), vars(b), where, shared)
    elif isinstance(a, np.ndarray):
        assert (a.dtype, a.shape, a.tobytes()) == (b.dtype, b.shape, b.tobytes()), where
    elif isinstance(a, io.BytesIO):
        assert a.getvalue() == b.getvalue(), where
    else:
        assert a == b, (where, a, b)


def _tensors(obj):
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from _tensors(v)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            yield from _tensors(v)


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    root = tmp_path_factory.mktemp("mapped")
    for name, (fam, lay, opts, opt) in CASES.items():
        example(fam, parse_layout(lay), root / name, opts, optimizer=opt)
    return root


@pytest.mark.parametrize("name", list(CASES))
def test_mapped_equals_torch_load(ckpts, name):
    files = sorted((ckpts / name).rglob("*.pt"))
    assert files
    for f in files:
        mine, theirs = mapped_pickle.load(f), _torch_load(f)
        _same(mine, theirs, str(f), {})
        # the reference-backed store finds each tensor in the file mapping just as it did under torch.load
        ts, tt = list(_tensors(mine)), list(_tensors(theirs))
        where = [RankFileLocator(f)(t) for t in ts]
        assert where == [RankFileLocator(f)(t) for t in tt] and any(w is not None for w in where)


def test_objects_equal_torch_load(tmp_path):
    base = torch.arange(12, dtype=torch.bfloat16)
    objs = [{1, 2}, io.BytesIO(b"x"), collections.OrderedDict(a=1), torch.nn.Parameter(torch.ones(2)),
            torch.nn.Parameter(torch.ones(2), requires_grad=False), torch.Size([2]), torch.bfloat16,
            argparse.Namespace(a=torch.float16, b=[1, 2.5, None]), base[1:].view(11), base.view(3, 4).t(),
            [base[:4], base[4:]], torch.ones(3, dtype=torch.float16).requires_grad_(), torch.zeros(0),
            torch.tensor(7, dtype=torch.int64), np.random.RandomState(1).get_state()]
    for i, obj in enumerate(objs):
        f = tmp_path / f"{i}.pt"
        torch.save({"a": obj}, f)
        _same(mapped_pickle.load(f), _torch_load(f), f"{obj!r}"[:60], {})
        _same(pickles.load_pt(f), _torch_load(f), f"{obj!r}"[:60], {})


def _with_pickle(src, dst, data: bytes):
    """A copy of the torch.save zip `src` whose data.pkl is `data`."""
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w", zipfile.ZIP_STORED) as zout:
        for info in zin.infolist():
            zout.writestr(info, data if info.filename.endswith("/data.pkl") else zin.read(info))


def test_refused_and_damaged_files_go_to_torch_load(tmp_path):
    f = tmp_path / "ok.pt"
    torch.save({"a": torch.ones(4)}, f)
    marker = tmp_path / "ran"
    evil = tmp_path / "evil.pt"
    _with_pickle(f, evil, b"cos\nsystem\n(S'touch " + str(marker).encode() + b"'\ntR.")
    frac = tmp_path / "frac.pt"
    torch.save({"a": fractions.Fraction(1, 3)}, frac)
    for p in (evil, frac):
        with pytest.raises(mapped_pickle.NotLite):
            mapped_pickle.load(p)
        with pytest.raises(BadInput, match="refusing to unpickle"):
            pickles.load_pt(p)
    assert not marker.exists()
    short = tmp_path / "short.pt"
    short.write_bytes(f.read_bytes()[: os.path.getsize(f) // 2])
    with pytest.raises(mapped_pickle.NotLite):
        mapped_pickle.load(short)
    with pytest.raises(BadInput, match="truncated or corrupt"):
        pickles.load_pt(short)
    with pytest.raises(mapped_pickle.NotLite):   # a pickle without torch's zip: torch.load decides
        (tmp_path / "plain.pt").write_bytes(pickle.dumps({"a": 1}))
        mapped_pickle.load(tmp_path / "plain.pt")
