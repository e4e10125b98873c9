"""Legacy-format safety: Megatron enums in args survive a weights-only round trip in any process."""
import subprocess
import sys
import textwrap

MAKE_ENUM = textwrap.dedent('''
    import sys, types, enum
    mod = types.ModuleType("megatron.fakeenums")
    class AttnBackend(enum.Enum):
        auto = 5
    AttnBackend.__module__ = "megatron.fakeenums"
    mod.AttnBackend = AttnBackend
    sys.modules["megatron.fakeenums"] = mod
''')


def _run(code: str) -> str:
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-800:]
    return r.stdout.strip()


def test_megatron_enum_stand_in_round_trip(tmp_path):
    src, out, blob = tmp_path / "a.pt", tmp_path / "b.pt", tmp_path / "blob"
    _run(MAKE_ENUM + f'''
import argparse, torch
torch.save({{"args": argparse.Namespace(attention_backend=AttnBackend.auto, params_dtype=torch.bfloat16)}}, "{src}")
''')
    # A process that does not know the class: load, re-save, and store the args as bytes.
    _run(f'''
import ckptctl.storage.pickles as pickles
sd = pickles.load_pt("{src}")
pickles.save_pt(sd, "{out}")
open("{blob}", "wb").write(pickles.dumps_bytes(sd["args"]))
''')
    # Another fresh process reads the stored bytes (it never loaded a rank file).
    assert "AttnBackend(5,)" in _run(f'''
import ckptctl.storage.pickles as pickles
print(pickles.loads_bytes(open("{blob}", "rb").read(), "args"))
''')
    # Megatron (here: the class defined again) reads our file back as its own enum.
    got = _run(MAKE_ENUM + f'''
import torch
print(torch.load("{out}", weights_only=False)["args"].attention_backend is AttnBackend.auto)
''')
    assert got == "True"


def test_non_megatron_global_refused(tmp_path):
    import os
    import pytest
    import torch
    from ckptctl.errors import BadInput
    import ckptctl.storage.pickles as pickles
    f = tmp_path / "x.pt"
    torch.save({"evil": os.system}, f)
    with pytest.raises(BadInput, match="allow-list"):
        pickles.load_pt(f)
