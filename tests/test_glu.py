"""The GLU MLP on its own (Megatron's test_mlp_glu): fc1 holds [W_r; V_r] per TP rank, so a TP change must
re-cut both halves, never concatenate local tensors. Expectations are rebuilt here by plain slicing."""
from __future__ import annotations

import pytest
import torch

from ckptctl.layout import parse_layout
from ckptctl.models import get_family
from ckptctl.models.base import KeyLoc
from ckptctl.models.config import ModelConfig
from ckptctl.models.rules import pieces
from tests.conftest import load, raw_bytes

GPT = get_family("gpt")


def _cfg(glu=True):
    return ModelConfig(family="gpt", num_layers=2, hidden=16, heads=4, groups=4, kv_channels=4, ffn=24, glu=glu,
                       tied=False, padded_vocab=128, true_vocab=128, vocab_divisor=128)


def _split_glu(full: torch.Tensor, tp: int) -> list[torch.Tensor]:
    """Independent expectation: rank r holds [W[r]; V[r]] with W = first half rows, V = second half."""
    F = full.shape[0] // 2
    n = F // tp
    return [torch.cat([full[r * n:(r + 1) * n], full[F + r * n:F + (r + 1) * n]]) for r in range(tp)]


@pytest.mark.parametrize("key", ["mlp.linear_fc1.weight", "mlp.linear_fc1.bias"])
@pytest.mark.parametrize("tp", [1, 2, 3, 4, 6])
def test_glu_fc1_pieces_match_independent_split(key, tp):
    rule = GPT.rule(KeyLoc("layer", "decoder", 0, key), _cfg())
    shape = (48, 16) if key.endswith("weight") else (48,)
    full = torch.randn(shape)
    want = _split_glu(full, tp)
    merged = torch.full_like(full, float("nan"))
    for r in range(tp):
        lshape, ps = pieces(rule, "a", {"a": shape}, tp, r)
        local = torch.empty(lshape)
        for p in ps:
            local[p.local.slices] = full[p.gbox.slices]
        assert raw_bytes(local) == raw_bytes(want[r])
        for p in ps:
            merged[p.gbox.slices] = local[p.local.slices]
    assert raw_bytes(merged) == raw_bytes(full)          # split -> merge round trip


def test_glu_off_is_a_plain_row_split():
    rule = GPT.rule(KeyLoc("layer", "decoder", 0, "mlp.linear_fc1.weight"), _cfg(glu=False))
    assert (rule.kind, rule.dim) == ("split", 0)


def _files(root):
    out = {}
    for p in sorted(root.glob("iter_*/mp_rank_*/model_optim_rng.pt")):
        out[p.parent.name] = load(p)["model"]
    return out


def _global_fc1(files: dict, tp: int, pp_dir: str, key: str) -> torch.Tensor:
    """Reassemble [W; V] from TP-local [W_r; V_r] tensors, written out independently of ckptctl."""
    parts = [files[f"mp_rank_{r:02d}{pp_dir}"][key] for r in range(tp)]
    half = parts[0].shape[0] // 2
    return torch.cat([p[:half] for p in parts] + [p[half:] for p in parts])


@pytest.mark.parametrize("src,dst", [("tp2pp2", "tp4pp2"), ("tp1pp1", "tp8pp1"), ("tp4pp1", "tp2pp2")])
def test_glu_tp_change_end_to_end(tmp_path, src, dst):
    from ckptctl.convert import convert
    from ckptctl.example import example
    from ckptctl.verify import verify

    s, d, b = tmp_path / "s", tmp_path / "d", tmp_path / "b"
    example("gpt", parse_layout(src), s, {"swiglu": True, "layers": 2, "hidden": 32, "heads": 8})
    convert(s, d, parse_layout(dst), nproc=0)
    assert verify(s, d).ok
    S, D = parse_layout(src), parse_layout(dst)
    fs, fd = _files(s), _files(d)
    for glayer in range(2):
        sp, sl = divmod(glayer, 2 // S.pp)
        dp_, dl = divmod(glayer, 2 // D.pp)
        for name in ("linear_fc1.weight", "linear_fc1.bias"):
            full = _global_fc1(fs, S.tp, f"_{sp:03d}" if S.pp > 1 else "", f"decoder.layers.{sl}.mlp.{name}")
            assert full.shape[0] == 2 * 128
            for r, want in enumerate(_split_glu(full, D.tp)):
                got = fd[f"mp_rank_{r:02d}" + (f"_{dp_:03d}" if D.pp > 1 else "")][f"decoder.layers.{dl}.mlp.{name}"]
                assert raw_bytes(got) == raw_bytes(want), (glayer, name, r)
    convert(d, b, S, nproc=0)                               # and back: every byte of every file
    fb = _files(b)
    assert set(fb) == set(fs)
    for f, sd in fs.items():
        for k, v in sd.items():
            if torch.is_tensor(v):
                assert raw_bytes(v) == raw_bytes(fb[f][k]), (f, k)
