"""`inspect` without torch (issue 13 item 5): the torch-free readers give the report the torch path gives, text
and JSON, on every kind of example; whatever they cannot read goes the torch path (its verdict, its message);
no global outside the allow-list is ever called."""
import fractions
import json
import os
import pickle
import subprocess
import sys

import pytest

from ckptctl import inspect_cmd
from ckptctl.example import example
from ckptctl.layout import parse_layout
from ckptctl.storage import lite_pickle

from conftest import run_cli

CASES = {   # name -> (family, layout, opts, optimizer, format)
    "gpt_adam": ("gpt", "tp2pp2", {"layers": 4}, "adam", None),
    "gpt_distopt": ("gpt", "tp1pp2dp2", {"layers": 4}, "distributed", None),
    "gpt_bf16_vpp": ("gpt", "tp2pp2vpp2", {"layers": 4, "dtype": "bfloat16", "groups": 2, "swiglu": True}, "adam", None),
    "gpt_none": ("gpt", "tp1pp1", {"layers": 2}, "none", None),
    "moe_subs": ("moe", "tp1pp1ep2", {"layers": 2}, "adam", None),
    "mamba": ("mamba", "tp2pp1", {}, "none", None),
    "torch_dist": ("gpt", "tp2pp1", {"layers": 2}, "distributed", "torch_dist"),
    "torch_dist_full": ("gpt", "tp1pp2dp2", {"layers": 2}, "distributed", "torch_dist:fully_reshardable"),
    "torch_dist_adam": ("gpt", "tp2pp2", {"layers": 4, "dtype": "bfloat16"}, "adam", "torch_dist"),
    "torch_dist_moe": ("moe", "tp1pp1ep2", {"layers": 2}, "adam", "torch_dist"),   # 2 sub-optimizers: torch path
}
TORCH_PATH = {"torch_dist_moe"}


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    root = tmp_path_factory.mktemp("lite")
    out = {}
    for name, (fam, lay, opts, opt, fmt) in CASES.items():
        fmt, _, sharding = (fmt or "").partition(":")
        example(fam, parse_layout(lay), root / name, opts, optimizer=opt, fmt=fmt or None,
                optim_sharding=sharding or None)
        out[name] = root / name
    return out


def _text(d: dict) -> list[str]:
    lines = []
    inspect_cmd.render(d, lines.append)
    return lines


@pytest.mark.parametrize("name", list(CASES))
def test_lite_report_equals_torch_report(ckpts, name):
    p = ckpts[name]
    torch_path = inspect_cmd.describe(p, lite=False)
    lite = inspect_cmd.describe(p)
    assert json.dumps(lite, sort_keys=True) == json.dumps(torch_path, sort_keys=True)
    assert _text(lite) == _text(torch_path)
    assert (inspect_cmd._inspect_lite(p, None) is None) == (name in TORCH_PATH)
    assert inspect_cmd.describe(p, true_vocab=100) == inspect_cmd.describe(p, true_vocab=100, lite=False)


def test_store_report_equals_and_cli_imports_no_torch(ckpts, tmp_path):
    st = tmp_path / "s.zarr"
    assert run_cli("convert", ckpts["gpt_adam"], st, "--nproc", "0").code == 0
    assert inspect_cmd.describe(st) == inspect_cmd.describe(st, lite=False)
    code = ("import sys; from ckptctl.cli import main; sys.argv = ['ckptctl', 'inspect', sys.argv[1], '--json']\n"
            "try:\n    main()\nexcept SystemExit as e:\n    assert e.code == 0, e.code\n"
            "heavy = sorted(m for m in ('torch', 'numpy', 'zarr') if m in sys.modules)\n"
            "assert not heavy, heavy")
    for p in (ckpts["gpt_adam"], ckpts["moe_subs"], ckpts["torch_dist"], st):
        r = subprocess.run([sys.executable, "-c", code, str(p)], capture_output=True, text=True)
        assert r.returncode == 0, r.stderr[-2000:]
        assert json.loads(r.stdout)["ok"]


def test_megatron_enum_in_args_prints_as_the_torch_path(ckpts, tmp_path):
    """args may hold Megatron's enums: both readers keep them as a stand-in printed the same way."""
    import shutil
    from ckptctl.storage import pickles
    p = tmp_path / "enum"
    shutil.copytree(ckpts["gpt_none"], p)
    f = next(p.rglob("model_optim_rng.pt"))
    sd = pickles.load_pt(f, mmap=False)
    sd["args"].softmax_type = pickles._stand_in("megatron.core.transformer.enums.AttnSoftmaxType")(1)
    pickles.save_pt(sd, f)
    lite = inspect_cmd.describe(p)
    assert inspect_cmd._inspect_lite(p, None) is not None
    assert lite == inspect_cmd.describe(p, lite=False)
    assert "AttnSoftmaxType" in lite["model"]["extra"]["softmax_type"]


def test_a_global_off_the_list_is_never_called(tmp_path):
    marker = tmp_path / "ran"
    evil = b"cos\nsystem\n(S'touch " + str(marker).encode() + b"'\ntR."
    with pytest.raises(lite_pickle.NotLite):
        lite_pickle.loads(evil)
    assert not marker.exists()
    with pytest.raises(lite_pickle.NotLite):    # a harmless class off the list: the torch path decides
        lite_pickle.loads(pickle.dumps(fractions.Fraction(1, 3)))


def test_what_lite_cannot_read_goes_the_torch_path(ckpts, tmp_path):
    """A refused global, a truncated rank file: the same exit code and message as the torch path."""
    import shutil
    import torch
    for how in ("global", "truncate"):
        p = tmp_path / how
        shutil.copytree(ckpts["gpt_adam"], p)
        f = sorted(p.rglob("model_optim_rng.pt"))[1]
        if how == "global":
            torch.save({"model": {}, "args": fractions.Fraction(1, 3)}, f)     # refused by both readers
        else:
            os.truncate(f, f.stat().st_size // 2)
        assert inspect_cmd._inspect_lite(p, None) is None
        r = run_cli("inspect", p)
        assert r.code == 2 and str(f) in r.err
        assert ("refusing to unpickle" if how == "global" else "truncated or corrupt") in r.err


def test_lite_never_accepts_what_the_torch_path_refuses(tmp_path):
    """The allow-lists agree: whatever the lite reader reads, `pickles.load_pt` reads too (what it cannot
    read, it leaves to torch)."""
    import argparse
    import collections
    import io
    import torch
    from ckptctl.errors import BadInput
    from ckptctl.storage import pickles
    objs = [{1, 2}, frozenset({1}), io.BytesIO(b"x"), collections.OrderedDict(a=1), torch.nn.Parameter(torch.ones(2)),
            torch.Size([2]), torch.bfloat16, slice(1, 2), complex(1, 2), argparse.Namespace(a=torch.float16),
            torch.ones(3, dtype=torch.float16)[1:], fractions.Fraction(1, 2)]
    read = 0
    for i, obj in enumerate(objs):
        f = tmp_path / f"{i}.pt"
        torch.save({"a": obj}, f)
        try:
            lite = lite_pickle.load(f)["a"]
        except lite_pickle.NotLite:
            continue
        read += 1
        try:
            full = pickles.load_pt(f)["a"]
        except BadInput as e:
            raise AssertionError(f"lite reads {obj!r}, the torch path refuses it: {e}") from None
        if torch.is_tensor(full):
            assert (lite.dtype.name, lite.shape) == (str(full.dtype)[6:], tuple(full.shape))
    assert read >= 7
