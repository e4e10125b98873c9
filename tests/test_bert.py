"""BERT (DESIGN §4.5): rules, the heads' split and padding against hand-written expectations, tied
copies over PP, round trips, and the CLI acceptance case tp1pp2 -> tp2pp1."""
import pytest
import torch
import torch.nn.functional as F

from ckptctl.layout import Layout
from ckptctl.models import detect_family, get_family
from ckptctl.models.rules import REPLICATED, SPLIT, VOCAB
from conftest import load, rank_files, raw_bytes

BERT = get_family("bert")


@pytest.fixture(scope="module")
def src(tmp_path_factory):
    """TP1PP1: every file holds the global tensors (vocab 100 pads to 128 here, to 256 at TP2)."""
    from conftest import run_cli
    d = tmp_path_factory.mktemp("bert") / "src"
    r = run_cli("example", "bert", "--layout", "tp1pp1", "--out", d, "--vocab", "100", "--layers", "4", "--tied")
    assert r.code == 0, r.err
    return d


@pytest.fixture(scope="module")
def d22(src, tmp_path_factory):
    from conftest import run_cli
    d = tmp_path_factory.mktemp("bert22") / "d"
    assert run_cli("convert", src, d, "--to", "tp2pp2", "--nproc", "0").code == 0
    return d


def model(root, name):
    return load(root / "iter_0000010" / name / "model_optim_rng.pt")["model"]


def _cfg(**kw):
    from ckptctl.example import make_config
    return make_config("bert", kw)


def test_rules_of_the_bert_keys():
    cfg = _cfg()
    want = {
        "embedding.word_embeddings.weight": (VOCAB, 0), "embedding.tokentype_embeddings.weight": (REPLICATED, 0),
        "encoder.layers.3.self_attention.linear_qkv.weight": (SPLIT, 0),
        "encoder.layers.0.self_attention.linear_proj.weight": (SPLIT, 1),
        "encoder.layers.1.mlp.linear_fc2.bias": (REPLICATED, 0), "encoder.final_layernorm.bias": (REPLICATED, 0),
        "lm_head.dense.weight": (REPLICATED, 0), "lm_head.layer_norm.bias": (REPLICATED, 0),
        "output_layer.weight": (VOCAB, 0), "output_layer.bias": (VOCAB, 0),
        "pooler.dense.weight": (REPLICATED, 0), "binary_head.bias": (REPLICATED, 0),
    }
    for key, (kind, dim) in want.items():
        r = BERT.rule(BERT.locate(key), cfg)
        assert (r.kind, r.dim if r.kind != REPLICATED else 0) == (kind, dim), key
    assert BERT.locate("lm_head.dense.weight").section == "post"
    assert BERT.locate("encoder.layers.2.input_layernorm.weight").stack == "encoder"
    assert detect_family(["embedding.word_embeddings.weight", "encoder.layers.0.input_layernorm.weight"], {}) == "bert"


def test_global_keys_are_megatron_cores_bert():
    """Top-level keys and order of megatron-core 0.19.2 BertModel (local spec), tied, binary head."""
    keys = [k for k, _ in BERT.global_keys(_cfg(layers=1, tied=True)) if ".layers." not in k]
    assert keys == ["embedding.word_embeddings.weight", "embedding.position_embeddings.weight",
                    "embedding.tokentype_embeddings.weight", "encoder.final_layernorm.weight",
                    "encoder.final_layernorm.bias", "lm_head.dense.weight", "lm_head.dense.bias",
                    "lm_head.layer_norm.weight", "lm_head.layer_norm.bias", "output_layer.bias",
                    "output_layer._extra_state", "binary_head.weight", "binary_head.bias",
                    "pooler.dense.weight", "pooler.dense.bias"]
    plain = [k for k, _ in BERT.global_keys(_cfg(layers=1, tied=False, binary_head=False))]
    assert "output_layer.weight" in plain and not any(k.startswith(("pooler", "binary_head", "embedding.tokentype"))
                                                      for k in plain)


def test_heads_split_and_padded_at_tp2pp2(src, d22, tmp_path, cli):
    """Output bias and embedding rows: zero-padded to Vp(TP2)=256 and cut in two (torch.chunk);
    the last stage holds a byte copy of the embedding as output_layer.weight; heads are whole."""
    g = model(src, "mp_rank_00")
    assert "output_layer.weight" not in g and g["output_layer.bias"].shape == (128,)
    emb = F.pad(g["embedding.word_embeddings.weight"], (0, 0, 0, 128))
    bias = F.pad(g["output_layer.bias"], (0, 128))
    for tp in range(2):
        first, last = model(d22, f"mp_rank_{tp:02d}_000"), model(d22, f"mp_rank_{tp:02d}_001")
        assert raw_bytes(first["embedding.word_embeddings.weight"]) == raw_bytes(emb.chunk(2)[tp])
        assert raw_bytes(last["output_layer.weight"]) == raw_bytes(emb.chunk(2)[tp])      # tied copy
        assert raw_bytes(last["output_layer.bias"]) == raw_bytes(bias.chunk(2)[tp])
        qkv = g["encoder.layers.3.self_attention.linear_qkv.weight"]
        assert raw_bytes(last["encoder.layers.1.self_attention.linear_qkv.weight"]) == raw_bytes(qkv.chunk(2)[tp])
        for k in ("lm_head.dense.weight", "lm_head.layer_norm.weight", "pooler.dense.bias", "binary_head.weight",
                  "encoder.final_layernorm.weight"):
            assert raw_bytes(last[k]) == raw_bytes(g[k]), k
        assert raw_bytes(first["embedding.tokentype_embeddings.weight"]) == raw_bytes(
            g["embedding.tokentype_embeddings.weight"])
        assert not any(k.startswith(("lm_head", "pooler", "output_layer")) for k in first)
    # and back: every byte returns (the added padding rows are dropped again)
    assert cli("convert", d22, tmp_path / "back", "--to", "tp1pp1", "--nproc", "0").code == 0
    back = model(tmp_path / "back", "mp_rank_00")
    assert list(back) == list(g)
    for k, t in g.items():
        assert (raw_bytes(back[k]) == raw_bytes(t)) if torch.is_tensor(t) else back[k] is None, k


def test_tied_copy_that_differs_is_reported(src, d22, tmp_path, cli):
    import shutil
    shutil.copytree(d22, tmp_path / "d")
    f = tmp_path / "d/iter_0000010/mp_rank_01_001/model_optim_rng.pt"
    sd = load(f)
    sd["model"]["output_layer.weight"][3, 5] += 1.0     # tp rank 1: embedding row 64 + 3
    torch.save(sd, f)
    r = cli("verify", src, tmp_path / "d", "--json")
    assert r.code == 1
    assert any(d["key"] == "embedding.word_embeddings.weight" for d in r.json()["differences"])


def test_cli_tp1pp2_to_tp2pp1(tmp_path, cli):
    """The acceptance case (shared/checks/families.sh); in-process (tests/test_t5.py runs the workers)."""
    assert cli("example", "bert", "--layout", "tp1pp2", "--out", tmp_path / "s").code == 0
    assert sorted(p.parent.name for p in rank_files(tmp_path / "s")) == ["mp_rank_00_000", "mp_rank_00_001"]
    assert "output_layer.weight" in model(tmp_path / "s", "mp_rank_00_001")     # BERT ties by default
    r = cli("convert", tmp_path / "s", tmp_path / "d", "--to", "tp2pp1", "--nproc", "0")
    assert r.code == 0, r.err
    v = cli("verify", tmp_path / "s", tmp_path / "d", "--json")
    assert v.code == 0 and v.json()["ok"], v.out[-2000:]
    d = model(tmp_path / "d", "mp_rank_01")
    assert "output_layer.weight" not in d and d["output_layer.bias"].shape == (128,)   # Vp 256 / TP2


def test_validate_names_the_problem():
    from ckptctl.errors import LayoutError
    with pytest.raises(LayoutError, match="attention heads"):
        BERT.validate(_cfg(), Layout(tp=3))
    with pytest.raises(LayoutError, match="experts"):
        BERT.validate(_cfg(), Layout(ep=2))
