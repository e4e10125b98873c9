"""RoPE scaling through Hugging Face: Megatron-LM's `--use-rope-scaling --rope-scaling-factor F` is
transformers' "llama3" rope with low/high frequency factors 1 and 4 and original context 8192 (megatron-core
0.19.2 hard-codes them), `--rotary-seq-len-interpolation-factor N` is "linear" with factor N. Judged by the
two libraries themselves: megatron-core's RotaryEmbedding built from the imported args and transformers'
rope initialisation from the exported config.json give the same inverse frequencies / angles, bytes.
Anything else is refused naming the feature (exit 2, nothing written)."""
from __future__ import annotations

import json
import shutil

import pytest
import torch

pytest.importorskip("safetensors")
transformers = pytest.importorskip("transformers")

from ckptctl.errors import BadInput  # noqa: E402
from ckptctl.hf import export_checkpoint, import_hf  # noqa: E402
from ckptctl.layout import parse_layout  # noqa: E402
from test_hf import LLAMA, make_example  # noqa: E402

SCALED = {"llama3": {"use_rope_scaling": True, "rope_scaling_factor": 32.0, "rotary_base": 500000.0},
          "linear": {"rotary_seq_len_interpolation_factor": 4}}


def _with_args(folder, **fields):
    for f in folder.rglob("model_optim_rng.pt"):
        sd = torch.load(f, map_location="cpu", weights_only=False)
        vars(sd["args"]).update(fields)
        torch.save(sd, f)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """kind -> (Megatron example with that RoPE scaling, its HF export, the HF folder imported at tp2)."""
    out = {}
    for kind, fields in SCALED.items():
        d = tmp_path_factory.mktemp(f"rope_{kind}")
        make_example("gpt", "tp1pp1", LLAMA + ["--groups", "2", "--layers", "1", "--vocab", "100"], d / "meg")
        _with_args(d / "meg", **fields)
        export_checkpoint(d / "meg", d / "hf", nproc=0)
        import_hf(d / "hf", d / "back", parse_layout("tp2"), nproc=0)
        out[kind] = d
    return out


def _megatron_rope(args):
    pytest.importorskip("megatron.core")
    from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding
    return RotaryEmbedding(kv_channels=args.kv_channels, rotary_percent=1.0, rotary_base=args.rotary_base,
                           rope_scaling=bool(getattr(args, "use_rope_scaling", False)),
                           rope_scaling_factor=getattr(args, "rope_scaling_factor", 8.0),
                           seq_len_interpolation_factor=getattr(args, "rotary_seq_len_interpolation_factor", None),
                           use_cpu_initialization=True)


def _imported_args(d):
    f = next((d / "back").rglob("model_optim_rng.pt"))
    return torch.load(f, map_location="cpu", weights_only=False)["args"]


def test_llama3_config_and_the_same_inverse_frequencies(exported):
    from transformers import AutoConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
    d = exported["llama3"]
    conf = json.loads((d / "hf" / "config.json").read_text())
    want = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 32.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
    assert conf["rope_parameters"] == want
    assert conf["rope_scaling"] == {k: v for k, v in want.items() if k != "rope_theta"}   # transformers 4 readers
    args = _imported_args(d)
    assert (args.use_rope_scaling, args.rope_scaling_factor, args.rotary_base) == (True, 32.0, 500000.0)
    hf_inv, _ = ROPE_INIT_FUNCTIONS["llama3"](AutoConfig.from_pretrained(d / "hf"), "cpu")
    mc_inv = _megatron_rope(args).inv_freq
    default = _megatron_rope(type(args)(**{**vars(args), "use_rope_scaling": False})).inv_freq
    assert not torch.equal(mc_inv, default)            # the scaling changes something at this head size
    assert hf_inv.dtype == mc_inv.dtype and torch.equal(hf_inv.view(torch.uint8), mc_inv.view(torch.uint8))


def test_linear_config_and_the_same_angles(exported):
    from transformers import AutoConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
    d = exported["linear"]
    conf = json.loads((d / "hf" / "config.json").read_text())
    assert conf["rope_parameters"] == {"rope_type": "linear", "rope_theta": 10000.0, "factor": 4.0}
    args = _imported_args(d)
    assert args.rotary_seq_len_interpolation_factor == 4 and not getattr(args, "use_rope_scaling", False)
    hf_inv, _ = ROPE_INIT_FUNCTIONS["linear"](AutoConfig.from_pretrained(d / "hf"), "cpu")
    n = 64
    hf_angles = torch.outer(torch.arange(n, dtype=torch.float32), hf_inv)   # transformers divides inv_freq
    mc_angles = _megatron_rope(args).get_freqs_non_repeated(n)               # megatron-core the positions
    assert torch.equal(hf_angles.view(torch.uint8), mc_angles.view(torch.uint8))   # factor 4: exact in fp32


@pytest.mark.parametrize("kind", list(SCALED))
def test_round_trip_config_is_identical(exported, kind, tmp_path):
    d = exported[kind]
    export_checkpoint(d / "back", tmp_path / "hf2", nproc=0)
    assert json.loads((tmp_path / "hf2" / "config.json").read_text()) == json.loads((d / "hf" / "config.json").read_text())


@pytest.mark.parametrize("rope,feature", [
    ({"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
      "original_max_position_embeddings": 4096}, "original_max_position_embeddings 4096"),
    ({"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 2.0, "high_freq_factor": 4.0,
      "original_max_position_embeddings": 8192}, "low_freq_factor 2.0"),
    ({"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 4096}, "RoPE scaling 'yarn'"),
    ({"rope_type": "dynamic", "factor": 2.0}, "RoPE scaling 'dynamic'"),
    ({"rope_type": "linear", "factor": 2.5}, "takes an integer"),
    ({"rope_type": "default", "partial_rotary_factor": 0.5}, "partial rotary"),
])
@pytest.mark.parametrize("key", ["rope_parameters", "rope_scaling"])
def test_import_refuses_what_megatron_cannot_compute(exported, rope, feature, key, tmp_path):
    src = tmp_path / "hf"
    shutil.copytree(exported["llama3"] / "hf", src)
    conf = json.loads((src / "config.json").read_text())
    conf.pop("rope_scaling")
    conf["rope_parameters"] = {"rope_type": "default", "rope_theta": 10000.0}
    conf[key] = {**conf[key], **rope} if key == "rope_parameters" else rope   # transformers reads rope_scaling first
    (src / "config.json").write_text(json.dumps(conf))
    with pytest.raises(BadInput, match=feature) as e:
        import_hf(src, tmp_path / "out", parse_layout("tp1"), nproc=0)
    assert e.value.exit_code == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf"]


def test_transformers_4_config_reads_the_same(exported, tmp_path):
    """`rope_scaling` + top-level `rope_theta` (transformers 4), original_max_position_embeddings from
    max_position_embeddings where the dict lacks it (as transformers 5 standardises it): the same args."""
    from ckptctl.formats.hf.arch import rope_args
    conf = json.loads((exported["llama3"] / "hf" / "config.json").read_text())
    old = {k: v for k, v in conf.items() if k not in ("rope_parameters",)}
    old["rope_scaling"] = {k: v for k, v in old["rope_scaling"].items() if k != "original_max_position_embeddings"}
    old["max_position_embeddings"] = 8192
    assert rope_args(old, "x") == rope_args(conf, "x") == {"rotary_base": 500000.0, "use_rope_scaling": True,
                                                          "rope_scaling_factor": 32.0}
    old["max_position_embeddings"] = 131072          # then it is not Megatron's fixed 8192
    with pytest.raises(BadInput, match="original_max_position_embeddings 131072"):
        rope_args(old, "x")
