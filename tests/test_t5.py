"""T5 (DESIGN §4.5): two stacks, cross attention split per head, aliased keys written twice and kept
byte-equal, relative positions replicated, the PP=1 refusal, and the CLI case tp2pp1 -> tp1pp1."""
import pytest
import torch
import torch.nn.functional as F

from ckptctl.layout import Layout
from ckptctl.models import detect_family, get_family
from ckptctl.models.rules import REPLICATED, SPLIT, VOCAB
from conftest import load, rank_files, raw_bytes

T5 = get_family("t5")


def _cfg(**kw):
    from ckptctl.example import make_config
    return make_config("t5", kw)


def model(root, name):
    return load(root / "iter_0000010" / name / "model_optim_rng.pt")["model"]


@pytest.fixture(scope="module")
def src(tmp_path_factory):
    from conftest import run_cli
    d = tmp_path_factory.mktemp("t5") / "src"
    r = run_cli("example", "t5", "--layout", "tp1pp1", "--out", d, "--layers", "2", "--encoder-layers", "3",
                "--vocab", "100")
    assert r.code == 0, r.err
    return d


def test_rules_and_stacks():
    cfg = _cfg(layers=2, encoder_layers=3)
    assert T5.stack_layers(cfg) == {"encoder": 3, "decoder": 2}
    want = {"decoder.layers.1.cross_attention.linear_kv.weight": (SPLIT, 0),
            "decoder.layers.1.cross_attention.linear_q.bias": (SPLIT, 0),
            "decoder.layers.0.cross_attention.linear_proj.weight": (SPLIT, 1),
            "decoder.layers.0.pre_cross_attn_layernorm.weight": (REPLICATED, 0),
            "encoder_relative_pos_emb.relative_attention_bias.weight": (REPLICATED, 0),
            "lm_head.output_layer.bias": (VOCAB, 0), "output_layer.weight": (VOCAB, 0)}
    for key, (kind, dim) in want.items():
        r = T5.rule(T5.locate(key), cfg)
        assert (r.kind, r.dim if r.kind != REPLICATED else 0) == (kind, dim), key
    assert detect_family(["encoder.layers.0.mlp.linear_fc1.weight", "decoder.layers.0.mlp.linear_fc1.weight"], {}) == "t5"


def test_global_keys_are_megatron_cores_t5():
    """Order and names of megatron-core 0.19.2 T5Model (local block specs, no TE: no final norms)."""
    keys = [k for k, _ in T5.global_keys(_cfg(layers=1, tied=True))]
    top = [k for k in keys if ".layers." not in k]
    assert top == ["embedding.word_embeddings.weight", "embedding.position_embeddings.weight",
                   "position_embeddings.weight", "lm_head.output_layer.bias", "lm_head.output_layer._extra_state",
                   "output_layer.bias", "output_layer._extra_state"]
    dec = [k.removeprefix("decoder.layers.0.") for k in keys if k.startswith("decoder.layers.0.")]
    assert dec[8:13] == ["pre_cross_attn_layernorm.weight", "pre_cross_attn_layernorm.bias",
                         "cross_attention.linear_proj.weight", "cross_attention.linear_proj.bias",
                         "cross_attention.linear_proj._extra_state"]
    rel = dict(T5.global_keys(_cfg(layers=1, position="relative", heads=8)))
    assert rel["decoder_relative_pos_emb.relative_attention_bias.weight"] == (32, 8)
    assert "position_embeddings.weight" not in rel


def test_tp2_split_against_heads_and_aliases(src, tmp_path, cli):
    g = model(src, "mp_rank_00")
    assert cli("convert", src, tmp_path / "d", "--to", "tp2pp1", "--nproc", "0").code == 0
    heads, hn, H = 8, 8, 64
    for tp in range(2):
        m = model(tmp_path / "d", f"mp_rank_{tp:02d}")
        # linear_kv rows are [k_h; v_h] per head: rank r holds whole heads r*4 .. r*4+3
        kv = g["decoder.layers.1.cross_attention.linear_kv.weight"].view(heads, 2 * hn, H)
        assert raw_bytes(m["decoder.layers.1.cross_attention.linear_kv.weight"]) == raw_bytes(
            kv[tp * 4:(tp + 1) * 4].reshape(-1, H))
        proj = g["decoder.layers.0.cross_attention.linear_proj.weight"]
        assert raw_bytes(m["decoder.layers.0.cross_attention.linear_proj.weight"]) == raw_bytes(
            proj[:, tp * 32:(tp + 1) * 32])
        assert raw_bytes(m["encoder.layers.2.self_attention.linear_qkv.bias"]) == raw_bytes(
            g["encoder.layers.2.self_attention.linear_qkv.bias"][tp * 96:(tp + 1) * 96])
        head = F.pad(g["lm_head.output_layer.weight"], (0, 0, 0, 128))[tp * 128:(tp + 1) * 128]
        assert raw_bytes(m["lm_head.output_layer.weight"]) == raw_bytes(head)
        assert raw_bytes(m["output_layer.weight"]) == raw_bytes(head)                 # alias, written twice
        assert raw_bytes(m["position_embeddings.weight"]) == raw_bytes(g["embedding.position_embeddings.weight"])
        assert list(m)[:3] == ["embedding.word_embeddings.weight", "embedding.position_embeddings.weight",
                               "position_embeddings.weight"]
        assert "encoder.layers.3.input_layernorm.weight" not in m and "decoder.layers.2.mlp.linear_fc1.weight" not in m
    assert cli("convert", tmp_path / "d", tmp_path / "back", "--to", "tp1pp1", "--nproc", "0").code == 0
    back = model(tmp_path / "back", "mp_rank_00")
    assert list(back) == list(g)
    for k, t in g.items():
        assert (raw_bytes(back[k]) == raw_bytes(t)) if torch.is_tensor(t) else back[k] is None, k


def test_alias_that_differs_is_reported(src, tmp_path, cli):
    import shutil
    shutil.copytree(src, tmp_path / "bad")
    f = rank_files(tmp_path / "bad")[0]
    sd = load(f)
    sd["model"]["position_embeddings.weight"][0, 0] += 1.0
    torch.save(sd, f)
    r = cli("verify", src, tmp_path / "bad", "--json")
    assert r.code == 1
    assert any(d["key"] == "embedding.position_embeddings.weight" for d in r.json()["differences"])


def test_pipeline_parallel_is_refused_before_writing(src, tmp_path, cli):
    r = cli("convert", src, tmp_path / "d", "--to", "tp1pp2", "--nproc", "0")
    assert r.code == 2 and "T5 supports pipeline parallelism 1 only" in r.err
    assert not (tmp_path / "d").exists() and not list(tmp_path.glob(".d*"))
    r = cli("example", "t5", "--layout", "tp1pp2", "--out", tmp_path / "e")
    assert r.code == 2 and "pipeline parallelism 1 only" in r.err and not (tmp_path / "e").exists()
    with pytest.raises(Exception, match="pipeline"):
        T5.validate(_cfg(), Layout(pp=1, vpp=2))


def test_cli_tp2pp1_to_tp1pp1_relative_tied_with_workers(tmp_path, cli):
    """The acceptance case (shared/checks/families.sh) with relative positions and shared embeddings."""
    r = cli("example", "t5", "--layout", "tp2pp1", "--out", tmp_path / "s", "--position", "relative", "--tied")
    assert r.code == 0, r.err
    s0 = model(tmp_path / "s", "mp_rank_00")
    assert "lm_head.output_layer.weight" not in s0 and s0["output_layer.bias"].shape == (128,)
    assert cli("convert", tmp_path / "s", tmp_path / "d", "--to", "tp1pp1", "--nproc", "2").code == 0
    v = cli("verify", tmp_path / "s", tmp_path / "d", "--json")
    assert v.code == 0 and v.json()["ok"], v.out[-2000:]
    d = model(tmp_path / "d", "mp_rank_00")
    rel = "decoder_relative_pos_emb.relative_attention_bias.weight"
    assert raw_bytes(d[rel]) == raw_bytes(s0[rel]) == raw_bytes(model(tmp_path / "s", "mp_rank_01")[rel])
    assert raw_bytes(d["output_layer.bias"]) == raw_bytes(d["lm_head.output_layer.bias"])
