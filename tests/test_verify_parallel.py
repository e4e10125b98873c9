"""verify --nproc (ckptctl.verify_parallel): workers each gather and compare a share of the global tensors;
the merged report equals the one-process report, differences and their order included."""
import os
import signal

import pytest
import torch

from ckptctl.convert import convert
from ckptctl.errors import BadInput
from ckptctl.example import example
from ckptctl.layout import parse_layout
from ckptctl.verify import verify

SMALL = {"layers": 2, "hidden": 32, "ffn": 64, "heads": 4, "vocab": 64}


def report(a, b, nproc):
    d = verify(a, b, nproc=nproc).to_json()
    d.pop("seconds")
    return d


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    t = tmp_path_factory.mktemp("vp")
    example("moe", parse_layout("tp2pp1ep2"), t / "src", dict(SMALL))
    convert(t / "src", t / "dst", parse_layout("tp1pp1ep1"), nproc=0)
    return t / "src", t / "dst"


def test_parallel_report_equals_the_one_process_report(pair):
    src, dst = pair
    one, two = report(src, dst, 1), report(src, dst, 2)
    assert one["ok"] and one["tensors"] > 10 and one == two


def test_parallel_report_names_the_same_differences(pair, tmp_path):
    src, dst = pair
    import shutil
    bad = tmp_path / "bad"
    shutil.copytree(dst, bad)
    f = next(bad.rglob("model_optim_rng.pt"))
    sd = torch.load(f, weights_only=False)
    flipped = []
    for k in list(sd["model"])[3::7]:        # every seventh tensor: several differences, spread over workers
        t = sd["model"][k]
        if torch.is_tensor(t) and t.numel():
            u = t.reshape(-1).view(torch.uint8)
            u[-1] ^= 0x01
            flipped.append(k)
    torch.save(sd, f)
    one, three = report(src, bad, 1), report(src, bad, 3)
    assert len(flipped) > 2 and not one["ok"] and len(one["differences"]) >= len(flipped)
    assert one == three


def _bad_input(name):
    raise BadInput(f"/x/model_optim_rng.pt: tensor {name!r} is unreadable")


def _killed(name):
    os.kill(os.getpid(), signal.SIGKILL)


def test_a_worker_error_is_the_error_of_the_command_and_a_dead_worker_exit_3(pair, monkeypatch):
    from ckptctl import verify_parallel
    from ckptctl.errors import WorkerFailure
    src, dst = pair
    monkeypatch.setattr(verify_parallel, "_one", _bad_input)   # the forked workers run this module's copy
    with pytest.raises(BadInput, match=r"^/x/model_optim_rng.pt: tensor '.*' is unreadable"):
        verify(src, dst, nproc=2)
    monkeypatch.setattr(verify_parallel, "_one", _killed)
    with pytest.raises(WorkerFailure, match="a verify worker died") as e:
        verify(src, dst, nproc=2)
    assert e.value.exit_code == 3
