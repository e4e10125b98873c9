"""State attached to the right parameter (issue 10; ckptctl/optstate/check.py, ckptctl/optstate/order.py): convert
refuses (exit 2, naming the tensor) and verify reports (exit 1) a master that is not its weight, and a file
whose parameter order is not the model's is refused naming the parameter. In process, no megatron-core."""
from __future__ import annotations

import shutil

import pytest
import torch

from conftest import load, raw_bytes

F32 = (torch.float32, torch.float32)


def _example(cli, root, *args):
    r = cli("example", "gpt", "--out", root, "--layers", "2", *args)
    assert r.code == 0, r.err
    return root


def _params(sd: dict) -> list[tuple[str, torch.Tensor]]:
    return [(k, v) for k, v in sd["model"].items() if torch.is_tensor(v)]


def _swap_flat(path, sd, a: str, b: str, dtypes=F32) -> None:
    """Swap the whole state (master and moments) of two same-shaped params inside a distrib_optim.pt, at the
    offsets an independent layout gives (reverse order, starts aligned to 64, one bucket)."""
    params = _params(sd)
    off, at = 0, {}
    for k, v in reversed(params):
        off = -(-off // 64) * 64
        at[k] = (off, v.numel())
        off += v.numel()
    f = load(path)
    e = f[0][dtypes]
    (oa, n), (ob, m) = at[a], at[b]
    assert n == m
    for c in ("param", "exp_avg", "exp_avg_sq"):
        x = e[c][oa:oa + n].clone()
        e[c][oa:oa + n] = e[c][ob:ob + n]
        e[c][ob:ob + n] = x
    torch.save(f, path)


def test_master_of_another_parameter_is_refused_and_reported(cli, tmp_path):
    src = _example(cli, tmp_path / "s", "--layout", "tp1pp1dp2", "--optimizer", "distributed")
    bad = tmp_path / "bad"
    shutil.copytree(src, bad)
    model = next(bad.rglob("model_optim_rng.pt"))
    a, b = "decoder.layers.0.mlp.linear_fc2.weight", "decoder.layers.1.mlp.linear_fc2.weight"
    _swap_flat(model.parent / "distrib_optim.pt", load(model), a, b)
    r = cli("convert", bad, tmp_path / "out", "--to", "tp2pp1dp1", "--nproc", "0")
    assert r.code == 2 and "fp32 master" in r.err and a in r.err, r.err
    assert not (tmp_path / "out").exists()
    # verify of the checkpoint against itself: decoding alone would call it equal; the invariant does not
    v = cli("verify", bad, bad, "--json")
    assert v.code == 1, v.out
    keys = {d["key"] for d in v.json()["differences"]}
    assert f"optim/param/{a}" in keys and f"optim/param/{b}" in keys
    assert cli("verify", src, src).code == 0


def test_bf16_master_rounds_to_weight(cli, tmp_path):
    """A bf16 model: the example's masters are not the weights but round to them; a master off by one
    bf16 ulp is caught."""
    src = _example(cli, tmp_path / "s", "--layout", "tp1pp1dp2", "--optimizer", "distributed", "--dtype", "bfloat16")
    model = next(src.rglob("model_optim_rng.pt"))
    sd = load(model)
    f = load(model.parent / "distrib_optim.pt")
    e = f[0][(torch.bfloat16, torch.float32)]
    k, w = _params(sd)[-1]                 # the last param sits first in the buffer
    m = e["param"][:w.numel()].view(w.shape)
    assert raw_bytes(m) != raw_bytes(w.float()) and raw_bytes(m.to(torch.bfloat16)) == raw_bytes(w)
    bad = tmp_path / "bad"
    shutil.copytree(src, bad)
    e["param"][3] = float(torch.tensor(e["param"][3].item()).to(torch.bfloat16).float() * 1.01)
    torch.save(f, next(bad.rglob("distrib_optim.pt")))
    r = cli("convert", bad, tmp_path / "out", "--to", "tp2pp1dp1", "--nproc", "0")
    assert r.code == 2 and k in r.err and "1 of" in r.err, r.err
    assert cli("verify", bad, bad).code == 1


@pytest.mark.parametrize("kind", ["distributed", "adam"])
def test_file_order_not_the_models_is_refused(cli, tmp_path, kind):
    """A legacy file listing its parameters in another order than megatron-core's modules: its state's
    indices / offsets cannot be attributed; refused naming the parameter, by convert and verify."""
    src = _example(cli, tmp_path / "s", "--layout", "tp1pp1", "--optimizer", kind)
    model = next(src.rglob("model_optim_rng.pt"))
    sd = load(model)
    keys = list(sd["model"])
    i, j = keys.index("decoder.layers.0.mlp.linear_fc1.weight"), keys.index("decoder.layers.0.mlp.linear_fc2.weight")
    keys[i], keys[j] = keys[j], keys[i]
    sd["model"] = {k: sd["model"][k] for k in keys}
    torch.save(sd, model)
    r = cli("convert", src, tmp_path / "out", "--to", "tp2pp1", "--nproc", "0")
    assert r.code == 2 and "decoder.layers.0.mlp.linear_fc2.weight" in r.err and "order" in r.err, r.err
    assert cli("verify", src, src).code == 2
    assert cli("convert", src, tmp_path / "w", "--to", "tp2pp1", "--nproc", "0", "--no-optimizer").code == 0


def test_model_order_hand_written():
    """Positions from the family's fresh-model keys; TE's fused norm just before its linear's weight; a
    parameter the config lacks (tied copy) just before its module's first key; unknown: None."""
    from types import SimpleNamespace

    from ckptctl.optstate.order import ModelOrder
    fam = SimpleNamespace(global_keys=lambda cfg: [(k, (1,)) for k in (
        "embedding.word_embeddings.weight", "decoder.layers.0.self_attention.linear_proj.weight",
        "decoder.layers.0.self_attention.linear_qkv.weight", "decoder.layers.0.self_attention.linear_qkv.bias",
        "decoder.final_layernorm.weight", "output_layer._extra_state")])
    o = ModelOrder(fam, None)
    pos = o.position
    assert pos("decoder.layers.0.self_attention.linear_proj.weight") == 1.0
    qkv = "decoder.layers.0.self_attention.linear_qkv."
    assert pos("decoder.layers.0.self_attention.linear_proj.weight") < pos(qkv + "layer_norm_weight") \
        < pos(qkv + "layer_norm_bias") < pos(qkv + "weight") < pos(qkv + "bias")
    assert pos("decoder.final_layernorm.weight") < pos("output_layer.weight") < pos("output_layer._extra_state")
    sa = "decoder.layers.0.self_attention."
    assert pos(qkv + "bias") < pos(sa + "q_layernorm.weight") < pos(sa + "q_layernorm.bias") \
        < pos(sa + "k_layernorm.weight") < pos("decoder.final_layernorm.weight")
    assert pos("embedding.word_embeddings.weight") < pos(sa + "core_attention.softmax_offset") < pos(sa + "linear_proj.weight")
    assert pos(sa + "post_attention_layernorm.weight") is None
    with pytest.raises(Exception, match="post_attention_layernorm"):
        o.require([sa + "post_attention_layernorm.weight"], "f")
    with pytest.raises(Exception, match="linear_proj"):
        o.check_sequence([qkv + "weight", "decoder.layers.0.self_attention.linear_proj.weight"], "f")


def test_bucket_chunk_boundaries():
    """A dp_reshardable bucket saves a chunk per parameter slice: a parameter whose derived range does not
    start and end on chunk boundaries (another order or bucket size) is refused, naming it."""
    from types import SimpleNamespace

    from ckptctl.errors import BadInput
    from ckptctl.optstate.check import check_bucket_chunks
    a, b = SimpleNamespace(key="a", numel=100), SimpleNamespace(key="b", numel=30)
    # saved: b at [0, 30), gap [30, 64), a at [64, 164), DP boundary at 82
    chunks = [[[0], [30]], [[30], [34]], [[64], [18]], [[82], [82]]]
    check_bucket_chunks(chunks, "k", [(0, 30, b), (64, 164, a)], 164, "w")
    with pytest.raises(BadInput, match="'a'"):                 # the other order: a first
        check_bucket_chunks(chunks, "k", [(0, 100, a), (128, 158, b)], 164, "w")
