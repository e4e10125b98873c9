"""`ckptctl plan CONFIG --from A --to B`: structure of its report, byte counts equal to an independent count
from the config (parameters x dtype size, optimizer = parameters x 4 bytes x arrays), file counts equal to
the layouts' own file lists, the shipped DeepSeek-V3 example, bad input (exit 2, one line), the
projection's work sharing equal to convert's `assign`, and no torch imported."""
from __future__ import annotations

import json
import random
import subprocess
import sys
from pathlib import Path

import pytest

from ckptctl.layout import parse_layout
from ckptctl.models.config import padded_vocab

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "deepseek-v3-671b.json"

SMALL = {"num_layers": 4, "hidden_size": 64, "num_attention_heads": 8, "group_query_attention": True,
         "num_query_groups": 2, "ffn_hidden_size": 96, "num_experts": 8, "moe_ffn_hidden_size": 32,
         "moe_shared_expert_intermediate_size": 16, "moe_router_enable_expert_bias": True, "vocab_size": 1000,
         "bf16": True, "swiglu": True, "untie_embeddings_and_output_weights": True, "add_bias_linear": False,
         "normalization": "RMSNorm", "position_embedding_type": "rope", "use_distributed_optimizer": True,
         "moe_layer_freq": [0, 1, 1, 1]}


def count(args: dict, src_tp: int, kv: int | None = None) -> tuple[int, int]:
    """(parameters, fp32 buffer elements) of a megatron-core GPT/MoE with TE-fused norms, from the args alone:
    written out module by module, not through ckptctl's rules."""
    h, heads, L = args["hidden_size"], args["num_attention_heads"], args["num_layers"]
    groups = args.get("num_query_groups") or heads
    kv = kv or args.get("kv_channels") or h // heads
    vp = padded_vocab(args["vocab_size"], args.get("make_vocab_size_divisible_by", 128), src_tp)
    glu = 2 if args.get("swiglu") else 1
    E, freq = args.get("num_experts", 0), args.get("moe_layer_freq", [1] * L)
    params = vp * h * (2 if args.get("untie_embeddings_and_output_weights") else 1) + h   # + final norm
    buffers = 0
    for i in range(L):
        params += h + (heads + 2 * groups) * kv * h + h * heads * kv      # fused input norm, qkv, proj
        params += h                                                        # pre-MLP norm (fused into fc1 or not)
        if E and freq[i]:
            f, s = args["moe_ffn_hidden_size"], args.get("moe_shared_expert_intermediate_size") or 0
            params += E * h + E * (glu * f * h + h * f) + (glu * s * h + h * s)
            buffers += E if args.get("moe_router_enable_expert_bias") else 0
        else:
            f = args["ffn_hidden_size"]
            params += glu * f * h + h * f
    return params, buffers


def mla_params(a: dict) -> int:
    """megatron-core MLASelfAttention's parameters per layer (q/kv down and up projections, norms, out)."""
    h, n = a["hidden_size"], a["num_attention_heads"]
    q, kv, qk, r, v = a["q_lora_rank"], a["kv_lora_rank"], a["qk_head_dim"], a["qk_pos_emb_head_dim"], a["v_head_dim"]
    return h * q + q + q * n * (qk + r) + h * (kv + r) + kv + kv * n * (qk + v) + n * v * h


@pytest.fixture
def small(tmp_path):
    p = tmp_path / "small.json"
    p.write_text(json.dumps(SMALL))
    return p


def check_structure(d: dict, src: str, dst: str):
    assert d["ok"] is True
    for k in ("source", "target", "store", "planning", "memory_per_worker", "rate", "projection"):
        assert k in d, k
    s, t = parse_layout(src), parse_layout(dst)
    assert d["source"]["files"] == len(s.model_files)
    assert d["source_layout"]["name"] == str(s) and d["target_layout"]["tp"] == t.tp
    p = d["projection"]
    assert p["workers"] == p["nodes"] * p["workers_per_node"]
    assert p["seconds"] >= p["source_phase"]["seconds"] + p["target_phase"]["seconds"]
    assert p["source_phase"]["bytes_moved"] >= d["source"]["weight_bytes"] + d["source"]["optimizer_bytes"]


@pytest.mark.parametrize("src,dst", [("tp2pp2ep4etp1", "tp1pp4ep2etp1"), ("tp1pp1", "tp2pp2ep2"),
                                     ("tp2pp1ep8", "tp2pp2ep2etp1dp4")])
def test_small_config(cli, small, src, dst):
    r = cli("plan", small, "--from", src, "--to", dst, "--nodes", "2", "--workers", "3", "--gbps", "1.5", "--json")
    assert r.code == 0, r.err
    d = r.json()
    check_structure(d, src, dst)
    params, buffers = count(SMALL, parse_layout(src).tp)
    assert d["parameters"] == params and d["buffer_elements"] == buffers
    st = d["store"]
    assert st["weight_bytes"] == params * 2 + buffers * 4            # bf16 parameters, fp32 router buffers
    assert st["optimizer_bytes"] == params * 4 * 3                   # distributed: fp32 master + 2 moments
    assert d["target"]["files"] == len(parse_layout(dst).with_(split=None).model_files)
    assert d["rate"]["bytes_per_s"] == 1.5e9 and d["projection"]["workers"] == 6
    # every weight byte of the store is read from the source and written to the target at least once
    assert d["source"]["weight_bytes"] >= st["weight_bytes"] <= d["target"]["weight_bytes"]


def test_no_optimizer_and_plain_adam(cli, small, tmp_path):
    r = cli("plan", small, "--from", "tp1pp1", "--to", "tp2pp1", "--no-optimizer", "--gbps", "1", "--json")
    assert r.code == 0, r.err
    d = r.json()
    assert d["optimizer"] is None and d["store"]["optimizer_bytes"] == 0 == d["source"]["optimizer_bytes"]
    fp32 = tmp_path / "fp32.yaml"          # YAML, fp32 weights, plain Adam: no separate master
    fp32.write_text("\n".join(f"{k}: {json.dumps(v)}" for k, v in {**SMALL, "bf16": False,
                                                                   "use_distributed_optimizer": False}.items()))
    d = cli("plan", fp32, "--from", "tp1pp1", "--to", "tp2pp1", "--gbps", "1", "--json").json()
    params, buffers = count(SMALL, 1)
    assert d["optimizer"] == "adam" and d["store"]["optimizer_bytes"] == params * 4 * 2
    assert d["store"]["weight_bytes"] == (params + buffers) * 4
    # plain Adam: every file holds the state of every parameter it holds
    assert d["target"]["optimizer_bytes"] > d["store"]["optimizer_bytes"]


def test_deepseek_v3_example(cli):
    args = {k: v for k, v in json.loads(EXAMPLE.read_text()).items() if not k.startswith("_")}
    src, dst = "tp8pp16ep64etp1", "tp4pp8ep32etp1"
    r = cli("plan", EXAMPLE, "--from", src, "--to", dst, "--decoder-first-pipeline-num-layers", "7",
            "--decoder-last-pipeline-num-layers", "6", "--nodes", "64", "--workers", "8", "--gbps", "1", "--json")
    assert r.code == 0, r.err
    d = r.json()
    check_structure(d, src, dst)
    assert d["target_split"] and "7" in d["target_split"] and "6" in d["target_split"]
    # MLA and the MTP layer with their own rules: DeepSeek-V3's count, module by module from its published config
    # (HF names: q_a_proj+norm, q_b_proj, kv_a_proj_with_mqa+norm, kv_b_proj, o_proj, two layer norms)
    h, mla = args["hidden_size"], mla_params(args) + 2 * args["hidden_size"]
    dense, moe = 3 * h * args["ffn_hidden_size"], 256 * h + 257 * 3 * h * 2048
    main = 129280 * h * 2 + h + 3 * (mla + dense) + 58 * (mla + moe)
    mtp = 2 * h + 2 * h * h + mla + moe + h               # enorm, hnorm, eh_proj, a MoE layer, final norm
    assert main == 671_026_404_352 and mtp == 11_610_067_968     # the published 671B main model; MTP's own weights
    pad = 2 * (130048 - 129280) * h                            # vocab padded to 128*TP8
    params, buffers = d["parameters"], d["buffer_elements"]
    assert params == main + mtp + pad == 682_647_482_368 and buffers == 59 * 256      # + the MTP layer's expert bias
    assert d["store"]["weight_bytes"] == params * 2 + buffers * 4
    assert d["store"]["optimizer_bytes"] == params * 12
    assert "stand_in" not in d and "left_out" not in d     # MLA and MTP are planned with their own rules
    assert any("replicated on every TP rank" in n for n in d["notes"])


@pytest.mark.parametrize("content,args,match", [
    (None, [], "cannot read the model config"),
    ("{not json", [], "not a valid JSON model config"),
    ('{"hidden_size": 8}', [], "lacks 'num_layers'"),
    (json.dumps(SMALL), ["--gbps", "0"], "--gbps: expected a positive rate"),
    (json.dumps(SMALL), ["--nodes", "0"], "--nodes: expected a count"),
    (json.dumps({**SMALL, "optimizer": "sgd"}), [], "Adam state only"),
    (json.dumps({**SMALL, "multi_latent_attention": True}), [], "needs q_lora_rank"),
])
def test_bad_input_is_one_line_exit_2(cli, tmp_path, content, args, match):
    p = tmp_path / "model.json"
    if content is not None:
        p.write_text(content)
    r = cli("plan", p, "--from", "tp1pp1", "--to", "tp2pp1", "--gbps", "1", *args, "--json")
    assert r.code == 2
    d = json.loads(r.out)
    assert d["ok"] is False and match in d["error"] and "\n" not in d["error"]


def test_projection_shares_work_as_convert_does():
    from ckptctl.plan_project import assign
    from ckptctl.reshard.comm import assign as convert_assign
    rnd = random.Random(0)
    for _ in range(200):
        sizes = [rnd.choice([1, 1, 2, 5, rnd.randint(1, 10 ** 6)]) for _ in range(rnd.randint(0, 60))]
        w = rnd.randint(1, 17)
        assert assign(sizes, w) == convert_assign(sizes, w)


def test_plan_imports_neither_torch_nor_zarr(small):
    code = ("import sys; from ckptctl import plan_cmd; from ckptctl.layout import parse_layout; "
            f"d = plan_cmd.run({str(small)!r}, parse_layout('tp2pp1'), parse_layout('tp1pp2'), with_optimizer=True, "
            "nodes=1, workers=2, gbps=1.0, node_gbps=None, measure_dir=None, max_memory=None); "
            "print(d['source']['files'], 'torch' in sys.modules, 'zarr' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT).stdout
    assert out.split() == ["2", "False", "False"]
