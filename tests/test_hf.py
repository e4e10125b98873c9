"""Hugging Face export and import (ckptctl/formats/hf), with transformers as the judge.

Per architecture, a `ckptctl example` checkpoint (legacy or torch_dist, some layout) is exported; every
safetensors tensor must equal, byte for byte, an expectation written here independently of ckptctl's
name map (explicit loops over query groups, GLU halves, experts, true-vocab rows) from the Megatron
tensors ckptctl's reference gather assembles from the rank files; transformers' `from_pretrained` must
load the folder and hold exactly those bytes; HF -> Megatron at another layout must give back the
source's tensors (padding rows zero) and HF again byte-identical files. Logits against megatron-core:
tests/test_hf_mcore.py.
"""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")
safetensors = pytest.importorskip("safetensors")

from ckptctl.errors import BadInput  # noqa: E402
from ckptctl.hf import export_checkpoint  # noqa: E402
from ckptctl.hf import import_hf  # noqa: E402
from ckptctl.layout import parse_layout  # noqa: E402

LLAMA = ["--swiglu", "--norm", "RMSNorm", "--position", "rope", "--no-bias"]
# case -> (family, layout, example options, HF model_type asked for (None: automatic), expected class,
#          layout of the import)
CASES = {
    "llama": ("gpt", "tp2pp2", LLAMA + ["--groups", "2", "--vocab", "100", "--layers", "4"], None,
              "LlamaForCausalLM", "tp1pp1"),
    "llama_bias_tied": ("gpt", "tp1pp2", LLAMA[:-1] + ["--bias", "--tied", "--layers", "2", "--vocab", "200"], None,
                        "LlamaForCausalLM", "tp2pp1"),
    "mistral_bf16_torch_dist": ("gpt", "tp2pp1", LLAMA + ["--groups", "4", "--layers", "2", "--dtype", "bfloat16",
                                                          "--format", "torch_dist"], "mistral", "MistralForCausalLM", "tp1pp2"),
    "qwen2": ("gpt", "tp2pp1", LLAMA + ["--qkv-bias", "--groups", "4", "--tied", "--layers", "2", "--vocab", "300"],
              None, "Qwen2ForCausalLM", "tp1pp2"),
    "mixtral": ("moe", "tp1pp2ep2", LLAMA + ["--groups", "2", "--layers", "2", "--experts", "4", "--moe-ffn", "32"],
                None, "MixtralForCausalLM", "tp2pp1"),
    "mixtral_grouped_etp1": ("moe", "tp2pp1ep2etp1dp2", LLAMA + ["--layers", "2", "--experts", "4", "--moe-ffn", "32",
                                                                 "--grouped", "--vocab", "100"], None,
                             "MixtralForCausalLM", "tp1pp1ep4"),
    "qwen2_moe": ("moe", "tp2pp1ep2", LLAMA + ["--qkv-bias", "--groups", "2", "--layers", "2", "--experts", "4",
                                              "--moe-ffn", "32", "--shared-ffn", "48", "--shared-gate", "--grouped"],
                  None, "Qwen2MoeForCausalLM", "tp1pp1ep4"),
}


def ckptctl(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ckptctl", *map(str, args)], capture_output=True, text=True,
                          timeout=600)


def make_example(family: str, layout: str, opts: list, out: Path) -> None:
    p = ckptctl("example", family, "--layout", layout, "--out", out, "--optimizer", "none", *opts)
    assert p.returncode == 0, p.stdout + p.stderr


# --- the expectation, written apart from ckptctl's name map -------------------------------------------

def gathered(src: Path) -> tuple[dict, dict]:
    """Megatron's global tensors from the rank files (ckptctl's reference gather, never the store) and the
    checkpoint's args."""
    from ckptctl.convert import inspect
    from ckptctl.verify_gather import Gatherer
    s = inspect(src)
    g = Gatherer(s)
    arrays = {}
    for name in s.plan.arrays:
        if name.startswith("model/"):
            t, diffs = g.gather(name)
            assert not diffs, diffs
            arrays[name[6:]] = t
    return arrays, s.cfg


def expected_hf(meg: dict, cfg, model_type: str, V: int) -> dict:
    """HF tensors as the architecture's modeling code defines them, from Megatron's global tensors."""
    ng, nh, hn = cfg.groups, cfg.heads, cfg.kv_channels
    r = nh // ng
    out = {"model.embed_tokens.weight": meg["embedding.word_embeddings.weight"][:V]}
    if "output_layer.weight" in meg:
        out["lm_head.weight"] = meg["output_layer.weight"][:V]
    out["model.norm.weight"] = meg["decoder.final_layernorm.weight"]
    moe_names = {"mixtral": ("block_sparse_moe", "w1", "w3", "w2", "gate"),
                 "qwen2_moe": ("mlp", "gate_proj", "up_proj", "down_proj", "gate"),
                 "qwen3_moe": ("mlp", "gate_proj", "up_proj", "down_proj", "gate")}

    def qkv(w):   # per query group g: q heads g*r .. g*r+r-1, then k_g, then v_g, hn rows each
        q, k, v = [], [], []
        for g in range(ng):
            base = g * (r + 2) * hn
            q += [w[base + i * hn: base + (i + 1) * hn] for i in range(r)]
            k.append(w[base + r * hn: base + (r + 1) * hn])
            v.append(w[base + (r + 1) * hn: base + (r + 2) * hn])
        return torch.cat(q), torch.cat(k), torch.cat(v)

    def halves(w):
        n = w.shape[0] // 2
        return w[:n], w[n:]

    for i in range(cfg.num_layers):
        m, h = f"decoder.layers.{i}.", f"model.layers.{i}."
        out[h + "input_layernorm.weight"] = meg[m + "input_layernorm.weight"]
        out[h + "post_attention_layernorm.weight"] = meg[m + "pre_mlp_layernorm.weight"]
        for part in ("weight", "bias"):
            if m + f"self_attention.linear_qkv.{part}" in meg:
                for p, t in zip("qkv", qkv(meg[m + f"self_attention.linear_qkv.{part}"])):
                    out[h + f"self_attn.{p}_proj.{part}"] = t
            if m + f"self_attention.linear_proj.{part}" in meg:
                out[h + f"self_attn.o_proj.{part}"] = meg[m + f"self_attention.linear_proj.{part}"]
        for p in "qk":   # per-head norms (Qwen3): the same (hn,) vector
            if m + f"self_attention.{p}_layernorm.weight" in meg:
                out[h + f"self_attn.{p}_norm.weight"] = meg[m + f"self_attention.{p}_layernorm.weight"]
        if m + "mlp.router.weight" in meg:
            blk, w1, w3, w2, gate = moe_names[model_type]
            out[h + f"{blk}.{gate}.weight"] = meg[m + "mlp.router.weight"]
            for e in range(cfg.num_experts):
                a, b = halves(meg[m + "mlp.experts.linear_fc1.weight"][e])
                out[h + f"{blk}.experts.{e}.{w1}.weight"], out[h + f"{blk}.experts.{e}.{w3}.weight"] = a, b
                out[h + f"{blk}.experts.{e}.{w2}.weight"] = meg[m + "mlp.experts.linear_fc2.weight"][e]
            if m + "mlp.shared_experts.linear_fc1.weight" in meg:
                a, b = halves(meg[m + "mlp.shared_experts.linear_fc1.weight"])
                out[h + "mlp.shared_expert.gate_proj.weight"], out[h + "mlp.shared_expert.up_proj.weight"] = a, b
                out[h + "mlp.shared_expert.down_proj.weight"] = meg[m + "mlp.shared_experts.linear_fc2.weight"]
                out[h + "mlp.shared_expert_gate.weight"] = meg[m + "mlp.shared_experts.gate_weight"]
        else:
            for part in ("weight", "bias"):
                if m + f"mlp.linear_fc1.{part}" in meg:
                    a, b = halves(meg[m + f"mlp.linear_fc1.{part}"])
                    out[h + f"mlp.gate_proj.{part}"], out[h + f"mlp.up_proj.{part}"] = a, b
                    out[h + f"mlp.down_proj.{part}"] = meg[m + f"mlp.linear_fc2.{part}"]
    return out


def hf_files(folder: Path) -> dict:
    """Every tensor of an HF folder, read with the safetensors library (through the index when sharded)."""
    from safetensors import safe_open
    index = folder / "model.safetensors.index.json"
    wm = json.loads(index.read_text())["weight_map"] if index.exists() else None
    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as h:
            for k in h.keys():
                assert wm is None or wm[k] == f.name, k
                out[k] = h.get_tensor(k)
    assert wm is None or set(wm) == set(out)
    return out


def same_bytes(a: torch.Tensor, b: torch.Tensor) -> bool:
    return (a.dtype == b.dtype and tuple(a.shape) == tuple(b.shape)
            and torch.equal(a.contiguous().reshape(-1).view(torch.uint8), b.contiguous().reshape(-1).view(torch.uint8)))


# --- fixtures ------------------------------------------------------------------------------------------

class Made:
    def __init__(self, root: Path):
        self.root, self.done = root, {}

    def get(self, case: str) -> dict:
        if case not in self.done:
            family, layout, opts, want, cls, back = CASES[case]
            d = self.root / case
            d.mkdir()
            make_example(family, layout, opts, d / "meg")
            rep = export_checkpoint(d / "meg", d / "hf", shard_size="150KB", hf_arch=want, nproc=0)
            self.done[case] = dict(dir=d, meg=d / "meg", hf=d / "hf", rep=rep, cls=cls, back=back)
        return self.done[case]


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    return Made(tmp_path_factory.mktemp("hf"))


# --- export --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("case", list(CASES))
def test_export_bytes_equal_megatron(made, case):
    m = made.get(case)
    meg, cfg = gathered(m["meg"])
    conf = json.loads((m["hf"] / "config.json").read_text())
    V = cfg.true_vocab
    assert conf["architectures"] == [m["cls"]] and conf["vocab_size"] == V
    assert meg["embedding.word_embeddings.weight"].shape[0] > V or case == "mixtral"   # padding rows existed
    want = expected_hf(meg, cfg, conf["model_type"], V)
    got = hf_files(m["hf"])
    assert sorted(got) == sorted(want)
    bad = [k for k in want if not same_bytes(got[k], want[k])]
    assert not bad, bad[:5]
    assert {str(t.dtype) for t in got.values()} == {str(meg["embedding.word_embeddings.weight"].dtype)}


@pytest.mark.parametrize("case", list(CASES))
def test_transformers_loads_the_same_bytes(made, case):
    m = made.get(case)
    files = hf_files(m["hf"])
    model = transformers.AutoModelForCausalLM.from_pretrained(m["hf"], dtype="auto")
    assert type(model).__name__ == m["cls"]
    sd = model.state_dict()
    conf = model.config
    for k, v in sd.items():
        if conf.model_type == "mixtral" and k not in files:   # transformers 5 names Mixtral's block `mlp`
            k = k.replace(".mlp.", ".block_sparse_moe.")
        if k in files:
            assert same_bytes(v, files[k]), k
        elif k.endswith(".experts.gate_up_proj") or k.endswith(".experts.down_proj"):
            # transformers 5 fuses the experts on load: [E, 2F, H] = per expert cat(gate, up); [E, H, F]
            pre = k.rsplit(".", 1)[0]
            names = ("w1", "w3", "w2") if conf.model_type == "mixtral" else ("gate_proj", "up_proj", "down_proj")
            for e in range(v.shape[0]):
                parts = ([files[f"{pre}.{e}.{names[0]}.weight"], files[f"{pre}.{e}.{names[1]}.weight"]]
                         if k.endswith("gate_up_proj") else [files[f"{pre}.{e}.{names[2]}.weight"]])
                assert same_bytes(v[e], torch.cat(parts)), f"{k}[{e}]"
        elif k == "lm_head.weight" and conf.tie_word_embeddings:
            assert same_bytes(v, files["model.embed_tokens.weight"])
        else:
            raise AssertionError(f"transformers holds {k}, which is in no file")
    with torch.no_grad():
        logits = model(torch.arange(24).reshape(2, 12) % conf.vocab_size).logits
    assert logits.shape == (2, 12, conf.vocab_size) and torch.isfinite(logits).all()


def test_shards_and_index(made):
    m = made.get("llama")
    idx = json.loads((m["hf"] / "model.safetensors.index.json").read_text())
    names = sorted({*idx["weight_map"].values()})
    n = len(names)
    assert n > 1 and names == [f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]
    files = hf_files(m["hf"])
    assert idx["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in files.values())
    for f in names:   # a shard holds more than one tensor only while it stays within the shard size
        from safetensors import safe_open
        with safe_open(str(m["hf"] / f), framework="pt") as h:
            sizes = [h.get_tensor(k).numel() * 4 for k in h.keys()]
        assert len(sizes) == 1 or sum(sizes) <= 150_000
    gen = json.loads((m["hf"] / "generation_config.json").read_text())
    assert gen["_from_model_config"] is True


def test_single_shard_is_model_safetensors(made, tmp_path):
    m = made.get("qwen2")
    rep = export_checkpoint(m["meg"], tmp_path / "one", shard_size="10GB", nproc=0)
    assert rep["files"] == ["model.safetensors"]
    assert sorted(p.name for p in (tmp_path / "one").iterdir()) == ["config.json", "generation_config.json",
                                                                    "model.safetensors"]
    one, many = hf_files(tmp_path / "one"), hf_files(m["hf"])
    assert sorted(one) == sorted(many) and all(same_bytes(one[k], many[k]) for k in one)


def test_dtype_option_casts(made, tmp_path):
    m = made.get("llama")
    export_checkpoint(m["meg"], tmp_path / "bf", dtype="bfloat16", nproc=0)
    got, src = hf_files(tmp_path / "bf"), hf_files(m["hf"])
    assert json.loads((tmp_path / "bf" / "config.json").read_text())["dtype"] == "bfloat16"
    assert all(got[k].dtype == torch.bfloat16 and same_bytes(got[k], src[k].to(torch.bfloat16)) for k in src)


# --- import and round trips ----------------------------------------------------------------------------

@pytest.mark.parametrize("case", list(CASES))
def test_import_gives_back_megatron_and_hf_round_trip_is_byte_identical(made, case, tmp_path):
    m = made.get(case)
    layout = parse_layout(m["back"])
    rep = import_hf(m["hf"], tmp_path / "meg", layout)
    meg, cfg = gathered(m["meg"])
    back, bcfg = gathered(tmp_path / "meg")
    V = cfg.true_vocab
    assert sorted(back) == sorted(meg)
    for k in meg:
        if k.endswith(("word_embeddings.weight", "output_layer.weight")):
            assert back[k].shape[0] == rep["padded_vocab"]
            assert same_bytes(back[k][:V], meg[k][:V]), k
            assert not back[k][V:].view(torch.uint8).any(), f"{k}: padding rows not zero"
        else:
            assert same_bytes(back[k], meg[k]), k
    import ckptctl.storage.pickles as pickles
    args = pickles.load_pt(next((tmp_path / "meg").rglob("model_optim_rng.pt")))["args"]
    assert (args.tensor_model_parallel_size, args.pipeline_model_parallel_size) == (layout.tp, layout.pp)
    assert args.padded_vocab_size == rep["padded_vocab"] and args.vocab_size == V
    assert args.normalization == "RMSNorm" and args.position_embedding_type == "rope" and args.swiglu
    assert (tmp_path / "meg" / "latest_checkpointed_iteration.txt").read_text() == "release"
    export_checkpoint(tmp_path / "meg", tmp_path / "hf2", shard_size="150KB", hf_arch=CASES[case][3], nproc=0)
    first = {p.name: p.read_bytes() for p in m["hf"].iterdir()}
    second = {p.name: p.read_bytes() for p in (tmp_path / "hf2").iterdir()}
    assert sorted(first) == sorted(second)
    assert [n for n in first if first[n] != second[n]] == []


@pytest.mark.parametrize("case", ["mixtral_grouped_etp1", "qwen2_moe"])
def test_import_with_grouped_experts_gives_back_the_grouped_rank_files(made, case, tmp_path):
    """--moe-grouped-gemm: a grouped-GEMM example's HF export imported at the example's own layout gives back its
    rank files: the same keys in the same order (TE's `experts.linear_fc1.weight{j}`), the same bytes (the
    `_extra_state` values aside: None here, no FP8 state)."""
    m = made.get(case)
    import_hf(m["hf"], tmp_path / "g", parse_layout(CASES[case][1]), moe_grouped_gemm=True, nproc=0)
    mine = {p.parent.name: p for p in (tmp_path / "g").rglob("model_optim_rng.pt")}
    theirs = {p.parent.name: p for p in m["meg"].rglob("model_optim_rng.pt")}
    assert sorted(mine) == sorted(theirs)
    for name in theirs:
        a = torch.load(mine[name], map_location="cpu", weights_only=False)
        b = torch.load(theirs[name], map_location="cpu", weights_only=False)
        assert list(a["model"]) == list(b["model"]), name
        assert any(".experts.linear_fc1.weight" in k for k in a["model"])
        tp, V = int(name.split("_")[2]), b["args"].vocab_size
        for k in ("embedding.word_embeddings.weight", "output_layer.weight"):    # HF has no padding rows
            if k in b["model"]:
                n = b["model"][k].shape[0]
                keep = max(0, min(n, V - tp * n))
                assert not a["model"][k][keep:].view(torch.uint8).any(), (name, k)
                a["model"][k], b["model"][k] = a["model"][k][:keep], b["model"][k][:keep]
        bad = [k for k, t in b["model"].items() if torch.is_tensor(t) and not same_bytes(a["model"][k], t)]
        assert bad == [], (name, bad[:5])
        assert a["args"].moe_grouped_gemm is True


def test_import_to_torch_dist(made, tmp_path):
    m = made.get("qwen2")
    import_hf(m["hf"], tmp_path / "dist", parse_layout("tp2pp1"), to_format="torch_dist")
    assert (tmp_path / "dist" / "latest_checkpointed_iteration.txt").exists()
    meg, cfg = gathered(m["meg"])
    back, _ = gathered(tmp_path / "dist")
    V = cfg.true_vocab
    for k in meg:
        n = V if k.endswith(("word_embeddings.weight", "output_layer.weight")) else None
        assert same_bytes(back[k][:n], meg[k][:n]), k


# --- refusals ------------------------------------------------------------------------------------------

REFUSED = {
    "layernorm": ("gpt", ["--swiglu", "--position", "rope", "--no-bias"], "LayerNorm normalization"),
    "learned_positions": ("gpt", ["--swiglu", "--norm", "RMSNorm", "--no-bias"], "learned absolute position"),
    "gelu_mlp": ("gpt", ["--norm", "RMSNorm", "--position", "rope", "--no-bias"], "non-gated MLP"),
    "moe_bias": ("moe", LLAMA[:-1] + ["--bias", "--experts", "4", "--layers", "1"], "linear biases on a MoE model"),
    "ungated_shared": ("moe", LLAMA + ["--experts", "4", "--shared-ffn", "32", "--layers", "1"], "ungated shared expert"),
    "bert": ("bert", [], "BERT"),
    "t5": ("t5", [], "T5"),
    "mamba": ("mamba", [], "Mamba"),
}


@pytest.mark.parametrize("case", list(REFUSED))
def test_refused_naming_the_feature(case, tmp_path):
    family, opts, feature = REFUSED[case]
    make_example(family, "tp1pp1", ["--layers", "2"] + opts if family in ("gpt", "moe") else opts, tmp_path / "meg")
    with pytest.raises(BadInput, match=feature) as e:
        export_checkpoint(tmp_path / "meg", tmp_path / "hf", nproc=0)
    assert e.value.exit_code == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["meg"]    # nothing written, no work folder left


@pytest.mark.parametrize("args,feature", [
    ({"multi_latent_attention": True}, "multi-latent attention"),
    ({"qk_layernorm": True, "add_bias_linear": True}, "linear biases with QK layernorm"),
    ({"rotary_percent": 0.5}, "partial rotary"),
    ({"rotary_interleaved": True}, "interleaved rotary"),
    ({"use_rope_scaling": True, "rotary_seq_len_interpolation_factor": 2}, "together with sequence-length"),
    ({"mtp_num_layers": 1}, "multi-token-prediction"),
    ({"position_embedding_type": "none"}, "position embedding 'none'"),
    ({"apply_residual_connection_post_layernorm": True}, "residual connection"),
])
def test_refused_args(args, feature):
    from ckptctl.formats.hf.arch import choose
    from ckptctl.models.config import config_from_args
    base = {"num_layers": 2, "hidden_size": 64, "num_attention_heads": 8, "ffn_hidden_size": 128, "swiglu": True,
            "normalization": "RMSNorm", "position_embedding_type": "rope", "add_bias_linear": False,
            "vocab_size": 128}
    a = {**base, **args}
    with pytest.raises(BadInput, match=feature):
        choose("gpt", config_from_args(a, "gpt"), a)
    choose("gpt", config_from_args(base, "gpt"), base)   # the same model without the feature maps


def test_import_refusals(made, tmp_path):
    m = made.get("qwen2")
    bad = tmp_path / "bad"
    shutil.copytree(m["hf"], bad)
    conf = json.loads((bad / "config.json").read_text())
    (bad / "config.json").write_text(json.dumps({**conf, "model_type": "gemma"}))
    with pytest.raises(BadInput, match="model_type 'gemma'"):
        import_hf(bad, tmp_path / "o1", parse_layout("tp1"))
    (bad / "config.json").write_text(json.dumps({**conf, "hidden_act": "gelu"}))
    with pytest.raises(BadInput, match="hidden_act"):
        import_hf(bad, tmp_path / "o2", parse_layout("tp1"))
    (bad / "config.json").write_text(json.dumps(conf))
    shard = sorted(bad.glob("model-*.safetensors"))[-1]
    shard.write_bytes(shard.read_bytes()[:-100])
    with pytest.raises(BadInput, match=f"{shard.name}: truncated"):
        import_hf(bad, tmp_path / "o3", parse_layout("tp1"))
    assert not any(p.name.startswith(("o1", "o2", "o3", ".o")) for p in tmp_path.iterdir())


def test_name_map_takes_te_norm_names_and_refuses_leftovers():
    """A source saved with TE's fused norm names maps the same; a store array with no HF place is refused."""
    from ckptctl.formats.hf.arch import Arch
    from ckptctl.formats.hf.names import check_covered, entries
    from ckptctl.models.config import ModelConfig
    cfg = ModelConfig("gpt", 1, 8, 2, 1, 4, 16, True, True, 32, 30, 32)
    L = "model/decoder.layers.0."
    arrays = {f"model/{k}": {} for k in ("embedding.word_embeddings.weight", "decoder.final_layernorm.weight")}
    arrays.update({L + k: {} for k in ("self_attention.linear_qkv.layer_norm_weight", "self_attention.linear_qkv.weight",
                                       "self_attention.linear_proj.weight", "mlp.linear_fc1.layer_norm_weight",
                                       "mlp.linear_fc1.weight", "mlp.linear_fc2.weight")})
    a = Arch("llama", False, False, False, False, False)
    ents = entries(a, cfg, arrays, 30)
    by = {e.hf: e.array for e in ents}
    assert by["model.layers.0.input_layernorm.weight"] == L + "self_attention.linear_qkv.layer_norm_weight"
    assert by["model.layers.0.post_attention_layernorm.weight"] == L + "mlp.linear_fc1.layer_norm_weight"
    assert "lm_head.weight" not in by                     # tied
    check_covered(ents, arrays, a)
    with pytest.raises(BadInput, match="softmax_offset"):
        check_covered(ents, {**arrays, L + "self_attention.core_attention.softmax_offset": {}}, a)
