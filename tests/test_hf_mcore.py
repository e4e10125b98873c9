"""Hugging Face export/import against megatron-core 0.19.2 and transformers (one torchrun launch).

tests/mcore/hf_models.py builds Llama-, Qwen2-, Qwen3-, Mixtral-, Qwen2-MoE- and Qwen3-MoE-style GPTModels with megatron-core
at a layout A, saves them as Megatron-LM does, and has ckptctl export each to Hugging Face and import it
back at a layout B, which megatron-core loads strictly and compares with its own reshard. Here,
transformers loads each HF folder with `from_pretrained`: its forward logits on megatron-core's fixed
batch must match megatron-core's within fp32 tolerance, and every HF tensor must equal the Megatron
tensor gathered from megatron-core's files, byte for byte (padding rows aside).
"""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.mcore

HERE = Path(__file__).parent
CASES = ["llama", "qwen2", "qwen3", "mixtral", "qwen2_moe", "qwen3_moe"]
CLASSES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM",
           "mixtral": "MixtralForCausalLM", "qwen2_moe": "Qwen2MoeForCausalLM", "qwen3_moe": "Qwen3MoeForCausalLM"}
# fp32 on CPU: the same math in another order (fused QKV vs three projections, GQA expansion, router)
LOGITS_TOL = 1e-4


def _sibling(name: str):
    spec = importlib.util.spec_from_file_location(f"ckptctl_tests_{name}", HERE / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    w = tmp_path_factory.mktemp("hf_mcore")
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
                        str(HERE / "mcore" / "hf_models.py"), "run", str(w), *CASES],
                       capture_output=True, text=True, env=env, timeout=600)
    assert (w / "result.json").exists(), (p.stdout + p.stderr)[-4000:]
    return w, json.loads((w / "result.json").read_text())


@pytest.mark.parametrize("case", CASES)
def test_import_loads_strictly_in_megatron_core(work, case):
    """HF -> Megatron at layout B: megatron-core loads it strictly; bytes equal its own reshard of A (true
    vocab rows; padding rows zero), logits at B equal A's."""
    _, res = work
    for r in res[case]:
        assert not r["errors"], r["errors"][0]
        assert r["strict_load"] == "ok", r
        assert r["mismatch"] == [], r["mismatch"][:5]
        assert r["padding"] and all(r["padding"].values()), r["padding"]
        assert r["args"]["normalization"] == "RMSNorm" and r["args"]["position_embedding_type"] == "rope"
    diffs = [r["logits_b_vs_a"] for r in res[case] if "logits_b_vs_a" in r]
    print(f"{case}: megatron-core at B (imported from HF) vs A logits max |diff| = {max(diffs):.3g}")
    assert diffs and max(diffs) <= LOGITS_TOL, diffs


@pytest.mark.parametrize("case", CASES)
def test_transformers_logits_match_megatron_core(work, case, record_property):
    w, _ = work
    ref = torch.load(w / case / "logits.pt")
    model = transformers.AutoModelForCausalLM.from_pretrained(w / case / "hf", dtype=torch.float32)
    assert type(model).__name__ == CLASSES[case]
    with torch.no_grad():
        got = model(ref["tokens"]).logits
    assert got.shape == ref["logits"].shape
    diff = float((got - ref["logits"]).abs().max())
    record_property("logits_max_abs_diff", diff)
    print(f"{case}: transformers vs megatron-core logits max |diff| = {diff:.3g}")
    assert diff <= LOGITS_TOL, diff


@pytest.mark.parametrize("case", CASES)
def test_hf_tensors_equal_megatron_core_tensors(work, case):
    w, _ = work
    t = _sibling("test_hf")
    meg, cfg = t.gathered(w / case / "A")
    conf = json.loads((w / case / "hf" / "config.json").read_text())
    want = t.expected_hf(meg, cfg, conf["model_type"], cfg.true_vocab)
    got = t.hf_files(w / case / "hf")
    assert sorted(got) == sorted(want)
    assert [k for k in want if not t.same_bytes(got[k], want[k])] == []
