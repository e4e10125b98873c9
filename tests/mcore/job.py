"""megatron-core oracle for GPT legacy (`torch`) checkpoints. Run under torchrun (gloo, CPU):

  python -m torch.distributed.run --standalone --nproc-per-node W tests/mcore/job.py save \
      --family gpt --layout tp2pp2 --cfg CFG.json --out DIR --dist-out DIST --logits LOGITS.pt [--seed S]
      Build megatron-core GPTModel chunks (local spec) under the layout, write DIR exactly as
      Megatron-LM core_v0.19.0 writes a legacy checkpoint (tracker, iter_0000010/mp_rank_TT[_PPP]/
      model_optim_rng.pt from the DP-rank-0 ranks), the same weights with dist_checkpointing.save
      (torch_dist, Megatron-LM's layout) into DIST, and the forward logits on a fixed input.

  python -m torch.distributed.run --standalone --nproc-per-node W tests/mcore/job.py load \
      --family gpt --layout tp1pp1 --cfg CFG.json --legacy DIR --dist DIST --logits-ref LOGITS.pt \
      --result OUT.json
      Build the model under the layout; load DIR's file for this (tp, pp) strictly; build it again
      and fill it with dist_checkpointing.load(DIST) (megatron-core reshards itself: the expected
      local tensors); compare every tensor byte for byte; compare the forward logits with the
      reference (true vocabulary, fp32 1e-4). Writes OUT.json; exits 1 on any difference.

W = tp*pp*dp. CFG is a JSON file or a JSON string. Uses none of ckptctl's rules.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import re
import sys
import zlib

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from cpu import compare_state, dist_metadata, gather, legacy_file, raw, save_dist, save_legacy, write_result  # noqa: E402,F401

ITERATION = 10
LOGITS_TOL = {"float32": 1e-4, "bfloat16": 5e-2, "float16": 5e-2}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


# ----------------------------------------------------------------------------- layout / config

def parse_layout(text: str) -> dict:
    m = re.fullmatch(r"(?:tp(\d+))?(?:pp(\d+))?(?:vpp(\d+))?(?:dp(\d+))?", text)
    if not m or not text:
        raise SystemExit(f"bad layout {text!r} (e.g. tp2pp2, tp1pp4vpp2, tp2pp1dp2)")
    tp, pp, vpp, dp = (int(g) if g else 1 for g in m.groups())
    return {"tp": tp, "pp": pp, "vpp": vpp, "dp": dp, "world": tp * pp * dp}


def world_size(text: str) -> int:
    return parse_layout(text)["world"]


DEFAULT_CFG = {
    "num_layers": 4, "hidden_size": 64, "num_attention_heads": 8, "num_query_groups": None,
    "ffn_hidden_size": 128, "swiglu": False, "tied": False, "vocab_size": 128,
    "make_vocab_size_divisible_by": 128, "seq_length": 16, "max_position_embeddings": 16,
    "position_embedding_type": "learned_absolute", "normalization": "LayerNorm",
    "add_bias_linear": True, "qk_layernorm": False, "dtype": "float32",
    "args_vocab_size": True,      # False: args.vocab_size = None (a real tokenizer, not NullTokenizer)
}


def load_cfg(text: str) -> dict:
    cfg = dict(DEFAULT_CFG)
    cfg.update(json.loads(text) if text.lstrip().startswith("{") else json.load(open(text)))
    if cfg["num_query_groups"] is None:
        cfg["num_query_groups"] = cfg["num_attention_heads"]
    return cfg


def padded_vocab(cfg: dict, tp: int) -> int:
    m = cfg["make_vocab_size_divisible_by"] * tp
    return int(math.ceil(cfg["vocab_size"] / m) * m)


def fixed_input(cfg: dict):
    s, b = cfg["seq_length"], 2
    tokens = (torch.arange(b * s).reshape(b, s) * 7 + 3).remainder(cfg["vocab_size"])
    pos = torch.arange(s).unsqueeze(0).expand(b, s).contiguous()
    mask = torch.triu(torch.ones(s, s, dtype=torch.bool), diagonal=1)[None, None]   # True = masked
    return tokens, pos, mask


# ----------------------------------------------------------------------------- model

def transformer_config(cfg: dict, lay: dict):
    from megatron.core.transformer.transformer_config import TransformerConfig

    dtype = DTYPES[cfg["dtype"]]
    return TransformerConfig(
        num_layers=cfg["num_layers"], hidden_size=cfg["hidden_size"],
        num_attention_heads=cfg["num_attention_heads"], num_query_groups=cfg["num_query_groups"],
        ffn_hidden_size=cfg["ffn_hidden_size"],
        gated_linear_unit=cfg["swiglu"],
        activation_func=torch.nn.functional.silu if cfg["swiglu"] else torch.nn.functional.gelu,
        bias_activation_fusion=False, add_bias_linear=cfg["add_bias_linear"],
        add_qkv_bias=cfg["add_bias_linear"], normalization=cfg["normalization"],
        qk_layernorm=cfg["qk_layernorm"],
        tensor_model_parallel_size=lay["tp"], pipeline_model_parallel_size=lay["pp"],
        virtual_pipeline_model_parallel_size=lay["vpp"] if lay["vpp"] > 1 else None,
        num_layers_in_first_pipeline_stage=lay.get("first"), num_layers_in_last_pipeline_stage=lay.get("last"),
        sequence_parallel=False, params_dtype=dtype, pipeline_dtype=dtype,
        bf16=dtype == torch.bfloat16, fp16=dtype == torch.float16,
        use_cpu_initialization=True, perform_initialization=True, init_method_std=0.05,
        hidden_dropout=0.0, attention_dropout=0.0, masked_softmax_fusion=False,
        gradient_accumulation_fusion=False, persist_layer_norm=False, bias_dropout_fusion=False,
        apply_rope_fusion=False)


def build_chunks(cfg: dict, lay: dict, seed: int, perturb: bool) -> list:
    """One GPTModel per virtual stage of this rank. With `perturb`, give every parameter that
    megatron-core initialises to a constant (norm weights, biases) distinct values, so that a
    misplaced tensor cannot hide behind equal ones; replicas (TP, DP) stay equal."""
    from megatron.core import parallel_state as ps
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.models.gpt.gpt_model import GPTModel

    tconf = transformer_config(cfg, lay)
    spec = get_gpt_layer_local_spec(normalization=cfg["normalization"], qk_layernorm=cfg["qk_layernorm"])
    vpp = lay["vpp"] if lay["vpp"] > 1 else None
    torch.manual_seed(seed + 100 * ps.get_pipeline_model_parallel_rank())   # stages differ
    chunks = []
    for v in range(lay["vpp"]):
        vp = v if vpp else None
        model = GPTModel(
            tconf, spec, vocab_size=padded_vocab(cfg, lay["tp"]),
            max_sequence_length=cfg["max_position_embeddings"],
            pre_process=ps.is_pipeline_first_stage(ignore_virtual=False, vp_stage=vp),
            post_process=ps.is_pipeline_last_stage(ignore_virtual=False, vp_stage=vp),
            parallel_output=False, share_embeddings_and_output_weights=cfg["tied"],
            position_embedding_type=cfg["position_embedding_type"], vp_stage=vp)
        model.eval()
        chunks.append(model)
    if perturb:
        tp_rank, pp_rank = ps.get_tensor_model_parallel_rank(), ps.get_pipeline_model_parallel_rank()
        with torch.no_grad():
            for v, model in enumerate(chunks):
                for name, p in model.named_parameters():
                    if name.startswith(("embedding.word_embeddings", "output_layer")):
                        continue   # random already; the tied copy must stay equal to the embedding
                    tag = f"{name}|pp{pp_rank}|v{v}" + (f"|tp{tp_rank}" if getattr(
                        p, "tensor_model_parallel", False) else "")
                    g = torch.Generator().manual_seed(zlib.crc32(tag.encode()) + seed)
                    p.add_(torch.randn(p.shape, generator=g).to(p.dtype) * 0.1)
    return chunks


def forward(chunks: list, cfg: dict, lay: dict):
    """Manual pipeline (blocking send/recv): virtual stage v*PP+p in order. Returns the logits over
    the true vocabulary [b, s, V] on the ranks of the last stage, else None."""
    from megatron.core import parallel_state as ps

    tokens, pos, mask = fixed_input(cfg)
    pp, vpp = lay["pp"], lay["vpp"]
    me = ps.get_pipeline_model_parallel_rank()
    dtype = DTYPES[cfg["dtype"]]
    shape = (cfg["seq_length"], tokens.shape[0], cfg["hidden_size"])
    out = None
    with torch.no_grad():
        for v in range(vpp):
            for p in range(pp):
                if p != me:
                    continue
                first, last = v == 0 and p == 0, v == vpp - 1 and p == pp - 1
                model = chunks[v]
                if not first:
                    buf = torch.empty(shape, dtype=dtype)
                    torch.distributed.recv(buf, src=ps.get_pipeline_model_parallel_prev_rank())
                    model.set_input_tensor(buf)
                y = model(tokens, pos, mask)
                if last:
                    out = y[..., : cfg["vocab_size"]].float().contiguous()
                else:
                    torch.distributed.send(y.contiguous(), dst=ps.get_pipeline_model_parallel_next_rank())
    return out


# ----------------------------------------------------------------------------- Megatron-LM files

def megatron_args(cfg: dict, lay: dict, ckpt_format: str):
    """args as Megatron-LM core_v0.19.0 saves them (arguments.py names). Besides the fields named
    here, Megatron-LM's args hold every TransformerConfig field (ArgumentGroupFactory): we add the
    plain-valued ones from the config actually used."""
    import enum

    tconf = transformer_config(cfg, lay)
    ns = argparse.Namespace()
    plain = (int, float, str, bool, type(None), torch.dtype, enum.Enum)
    for k, v in vars(tconf).items():
        if not k.startswith("_") and (isinstance(v, plain) or (
                isinstance(v, (list, tuple)) and all(isinstance(x, plain) for x in v))):
            setattr(ns, k, v)
    dtype = DTYPES[cfg["dtype"]]
    L, pp, vpp = cfg["num_layers"], lay["pp"], lay["vpp"]
    fields = dict(
        rank=0, world_size=lay["world"], local_rank=0,
        num_layers=L, encoder_num_layers=L, decoder_num_layers=None,
        hidden_size=cfg["hidden_size"], ffn_hidden_size=cfg["ffn_hidden_size"],
        num_attention_heads=cfg["num_attention_heads"],
        num_query_groups=cfg["num_query_groups"],
        group_query_attention=cfg["num_query_groups"] != cfg["num_attention_heads"],
        kv_channels=cfg["hidden_size"] // cfg["num_attention_heads"],
        swiglu=cfg["swiglu"],
        untie_embeddings_and_output_weights=not cfg["tied"],
        vocab_size=cfg["vocab_size"] if cfg["args_vocab_size"] else None,
        padded_vocab_size=padded_vocab(cfg, lay["tp"]),
        make_vocab_size_divisible_by=cfg["make_vocab_size_divisible_by"],
        tokenizer_type="NullTokenizer" if cfg["args_vocab_size"] else "GPT2BPETokenizer",
        max_position_embeddings=cfg["max_position_embeddings"], seq_length=cfg["seq_length"],
        encoder_seq_length=cfg["seq_length"], decoder_seq_length=None,
        position_embedding_type=cfg["position_embedding_type"], use_rotary_position_embeddings=False,
        rotary_base=10000, rotary_percent=1.0, rotary_seq_len_interpolation_factor=None,
        normalization=cfg["normalization"], norm_epsilon=1e-5,
        add_bias_linear=cfg["add_bias_linear"], add_qkv_bias=cfg["add_bias_linear"],
        qk_layernorm=cfg["qk_layernorm"], apply_residual_connection_post_layernorm=False,
        transformer_impl="local", spec=None,
        tensor_model_parallel_size=lay["tp"], pipeline_model_parallel_size=pp,
        transformer_pipeline_model_parallel_size=pp,
        virtual_pipeline_model_parallel_size=vpp if vpp > 1 else None,
        num_layers_per_virtual_pipeline_stage=L // (pp * vpp) if vpp > 1 else None,
        num_virtual_stages_per_pipeline_rank=None, pipeline_model_parallel_layout=None,
        decoder_first_pipeline_num_layers=lay.get("first"), decoder_last_pipeline_num_layers=lay.get("last"),
        num_layers_in_first_pipeline_stage=lay.get("first"), num_layers_in_last_pipeline_stage=lay.get("last"),
        account_for_embedding_in_pipeline_split=False, account_for_loss_in_pipeline_split=False,
        expert_model_parallel_size=1, expert_tensor_parallel_size=lay["tp"],
        context_parallel_size=1, data_parallel_size=lay["dp"],
        num_experts=None, moe_ffn_hidden_size=None,
        sequence_parallel=False, use_tp_pp_dp_mapping=False,
        params_dtype=dtype, bf16=dtype == torch.bfloat16, fp16=dtype == torch.float16,
        use_distributed_optimizer=False, data_parallel_random_init=False,
        ckpt_format=ckpt_format, use_dist_ckpt=ckpt_format != "torch",
        no_save_optim=None, no_save_rng=None, no_load_optim=None, no_load_rng=None,
        save="checkpoints", load=None, save_interval=ITERATION, iteration=ITERATION,
        train_iters=100, micro_batch_size=2, global_batch_size=2 * lay["dp"],
        lr=3e-4, min_lr=3e-5, lr_decay_style="cosine", lr_warmup_iters=2, weight_decay=0.01,
        clip_grad=1.0, seed=1234, optimizer="adam", adam_beta1=0.9, adam_beta2=0.95, adam_eps=1e-8,
        consumed_train_samples=ITERATION * 2 * lay["dp"],
    )
    for k, v in fields.items():
        setattr(ns, k, v)
    for k in ("gated_linear_unit", "activation_func_fp8_input_store", "test_mode"):  # not CLI args
        if hasattr(ns, k):
            delattr(ns, k)
    return ns


def rng_state(seed: int, tp_rank: int, pp_rank: int) -> list:
    """Megatron-LM's get_rng_state() list (one entry: no data_parallel_random_init). CUDA states are
    16-byte Philox (seed, offset) tensors on GPU; we fabricate them in that form per rank."""
    import random

    import numpy as np

    s = seed + 100 * pp_rank                       # Megatron-LM's _set_random_seed
    random.seed(s)
    np.random.seed(s)
    cpu = torch.Generator().manual_seed(s).get_state()

    def philox(x):
        return torch.tensor([x, 0], dtype=torch.int64).view(torch.uint8).clone()

    return [{
        "random_rng_state": random.getstate(),
        "np_rng_state": np.random.get_state(),
        "torch_rng_state": cpu,
        "cuda_rng_state": philox(s),
        "rng_tracker_states": {
            "model-parallel-rng": philox(s + 2718 + tp_rank),
            "expert-parallel-rng": philox(s + 1024 + tp_rank),
            "data-parallel-rng": philox(s),
        },
    }]


def opt_param_scheduler_state() -> dict:
    return {"max_lr": 3e-4, "lr_warmup_steps": 4, "num_steps": ITERATION * 2, "lr_decay_style": "cosine",
            "lr_decay_steps": 200, "min_lr": 3e-5, "start_wd": 0.01, "end_wd": 0.01,
            "wd_incr_style": "constant", "wd_incr_steps": 200}


def legacy_name(root: str, lay: dict, tp_rank: int, pp_rank: int) -> str:
    """This rank's file (megatron-core's parallel state is at `lay`: tp_rank, pp_rank are its ranks)."""
    return legacy_file(root, ITERATION)


def model_keys(n: int) -> list[str]:
    return ["model"] if n == 1 else [f"model{i}" for i in range(n)]



def save(a, cfg: dict, lay: dict) -> None:
    from megatron.core import parallel_state as ps
    from megatron.core.dist_checkpointing.mapping import ShardedObject

    tp_rank, pp_rank = ps.get_tensor_model_parallel_rank(), ps.get_pipeline_model_parallel_rank()
    chunks = build_chunks(cfg, lay, a.seed, perturb=True)

    # legacy torch format: DP-rank-0 (or expert-DP-rank-0) ranks write their (tp, pp) file
    def legacy_state():
        sd = {"args": megatron_args(cfg, lay, "torch"), "checkpoint_version": 3.0, "iteration": ITERATION}
        for key, model in zip(model_keys(len(chunks)), chunks):
            sd[key] = model.state_dict_for_save_checkpoint()
        sd["opt_param_scheduler"] = opt_param_scheduler_state()
        sd["rng_state"] = rng_state(a.seed, tp_rank, pp_rank)
        sd["num_floating_point_operations_so_far"] = 1.25e12
        return sd
    save_legacy(a.out, ITERATION, legacy_state)

    # torch_dist, as Megatron-LM lays it out (iter dir, tracker, common args)
    if a.dist_out:
        meta = dist_metadata()
        sd = {"args": megatron_args(cfg, lay, "torch_dist"), "checkpoint_version": 3.0,
              "iteration": ITERATION}
        for key, model in zip(model_keys(len(chunks)), chunks):
            sd[key] = model.sharded_state_dict(metadata=meta)
        sd["opt_param_scheduler"] = opt_param_scheduler_state()
        sd["rng_state"] = ShardedObject("rng_state", rng_state(a.seed, tp_rank, pp_rank), (lay["pp"], lay["tp"]),
                                        (pp_rank, tp_rank), replica_id=ps.get_data_parallel_rank(
                                            with_context_parallel=True))
        sd["num_floating_point_operations_so_far"] = 1.25e12
        save_dist(a.dist_out, ITERATION, sd)

    if a.logits:
        out = forward(chunks, cfg, lay)
        if out is not None and tp_rank == 0 and ps.get_data_parallel_rank() == 0:
            torch.save({"logits": out, "layout": a.layout, "cfg": cfg}, a.logits)
    torch.distributed.barrier()

    if a.check_result:     # identity check of what was just written, in the same launch
        if not (a.dist_out and a.logits):
            raise SystemExit("--check-result needs --dist-out and --logits")
        return load(argparse.Namespace(layout=a.layout, seed=a.seed, legacy=a.out, dist=a.dist_out,
                                       logits_ref=a.logits, result=a.check_result), cfg, lay)
    return 0


# ----------------------------------------------------------------------------- load and compare

def load(a, cfg: dict, lay: dict) -> int:
    from megatron.core import dist_checkpointing
    from megatron.core import parallel_state as ps

    rank = torch.distributed.get_rank()
    tp_rank, pp_rank = ps.get_tensor_model_parallel_rank(), ps.get_pipeline_model_parallel_rank()
    res = {"rank": rank, "tp": tp_rank, "pp": pp_rank, "dp": ps.get_data_parallel_rank(),
           "errors": [], "mismatch": [], "missing": [], "unexpected": [], "non_tensor": [], "tensors": 0}

    # expected: megatron-core's own resharding of the torch_dist reference
    ref = build_chunks(cfg, lay, a.seed + 1, perturb=False)
    keys = model_keys(len(ref))
    it = os.path.join(a.dist, f"iter_{ITERATION:07d}")
    loaded = dist_checkpointing.load({k: m.sharded_state_dict(metadata=dist_metadata())
                                      for k, m in zip(keys, ref)}, it)
    for k, m in zip(keys, ref):
        m.load_state_dict(loaded[k], strict=True)

    # under test: the legacy file of this (tp, pp), loaded strictly
    path = legacy_name(a.legacy, lay, tp_rank, pp_rank)
    models = build_chunks(cfg, lay, a.seed + 2, perturb=False)
    res["file"] = os.path.relpath(path, a.legacy)
    try:
        sd = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:  # noqa: BLE001
        sd = None
        res["errors"].append(f"cannot read {res['file']}: {e}")
    if sd is not None:
        args = sd.get("args")
        want = {"tensor_model_parallel_size": lay["tp"], "pipeline_model_parallel_size": lay["pp"],
                "virtual_pipeline_model_parallel_size": lay["vpp"] if lay["vpp"] > 1 else None,
                "padded_vocab_size": padded_vocab(cfg, lay["tp"]), "num_layers": cfg["num_layers"],
                "decoder_first_pipeline_num_layers": lay.get("first"),
                "decoder_last_pipeline_num_layers": lay.get("last"),
                "hidden_size": cfg["hidden_size"], "num_attention_heads": cfg["num_attention_heads"]}
        for f, v in want.items():
            if getattr(args, f, "<absent>") != v:
                res["errors"].append(f"args.{f} = {getattr(args, f, '<absent>')!r}, expected {v!r}")
        res["args_layout"] = {f: getattr(args, f, None) for f in (
            "data_parallel_size", "world_size", "expert_tensor_parallel_size", "sequence_parallel")}
        if sd.get("checkpoint_version") != 3.0:
            res["errors"].append(f"checkpoint_version {sd.get('checkpoint_version')!r}")
        present = [k for k in sd if re.fullmatch(r"model\d*", k)]
        if sorted(present) != sorted(keys):
            res["errors"].append(f"model keys {sorted(present)} != {keys}")
        for k, m in zip(keys, models):
            if k not in sd:
                continue
            res.setdefault("non_tensor_types", [])
            res["non_tensor_types"] = sorted(set(res["non_tensor_types"]) | {
                type(v).__name__ for v in sd[k].values() if not torch.is_tensor(v)})
            want_keys, have_keys = set(m.state_dict()), set(sd[k])
            res["missing"] += [f"{k}/{x}" for x in sorted(want_keys - have_keys)]
            res["unexpected"] += [f"{k}/{x}" for x in sorted(have_keys - want_keys)]
            try:
                m.load_state_dict(sd[k], strict=True)
            except Exception as e:  # noqa: BLE001
                res["errors"].append(f"{k}: load_state_dict(strict=True) failed: {str(e)[:500]}")
        for k, m, r in zip(keys, models, ref):
            bad, other = compare_state(m.state_dict(), r.state_dict())
            res["mismatch"] += [f"{k}/{x}" for x in bad]
            res["non_tensor"] += [f"{k}/{x}" for x in other]
            res["tensors"] += sum(torch.is_tensor(v) for v in r.state_dict().values())

    # logits against the reference (layout A)
    out = forward(models, cfg, lay)
    if out is not None:
        want = torch.load(a.logits_ref, map_location="cpu", weights_only=False)["logits"]
        if want.shape != out.shape:
            res["errors"].append(f"logits shape {tuple(out.shape)} != {tuple(want.shape)}")
        else:
            diff = (out - want).abs().max().item()
            res["logits_max_diff"] = diff
            if not diff <= LOGITS_TOL[cfg["dtype"]]:
                res["errors"].append(f"logits differ by {diff}")

    gathered = gather(res)
    ok = all(not (r["errors"] or r["mismatch"] or r["missing"] or r["unexpected"]) for r in gathered)
    ok = ok and any("logits_max_diff" in r for r in gathered)
    diffs = [r["logits_max_diff"] for r in gathered if "logits_max_diff" in r]
    write_result(a.result, {"ok": ok, "layout": a.layout, "logits_max_diff": max(diffs) if diffs else None,
                            "ranks": gathered}, ok, f"job.py load {a.layout}")
    torch.distributed.barrier()
    return 0 if ok else 1


# ----------------------------------------------------------------------------- main

def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    for name in ("save", "load"):
        q = sub.add_parser(name)
        q.add_argument("--family", default="gpt", choices=["gpt"])
        q.add_argument("--layout", required=True)
        q.add_argument("--cfg", required=True, help="JSON file or JSON text")
        q.add_argument("--seed", type=int, default=1234)
        q.add_argument("--first", type=int, help="layers on the first pipeline stage (uneven split)")
        q.add_argument("--last", type=int, help="layers on the last pipeline stage (uneven split)")
        if name == "save":
            q.add_argument("--out", required=True)
            q.add_argument("--dist-out")
            q.add_argument("--logits")
            q.add_argument("--check-result", help="then load it back at the same layout (identity) "
                           "and write this result JSON")
        else:
            q.add_argument("--legacy", required=True)
            q.add_argument("--dist", required=True)
            q.add_argument("--logits-ref", required=True)
            q.add_argument("--result", required=True)
    a = p.parse_args(argv)
    lay, cfg = parse_layout(a.layout), load_cfg(a.cfg)
    lay.update(first=a.first, last=a.last)

    from cpu import init_parallel, patch_cuda_for_cpu

    patch_cuda_for_cpu()
    if int(os.environ.get("WORLD_SIZE", "1")) != lay["world"]:
        raise SystemExit(f"layout {a.layout} needs {lay['world']} processes, got {os.environ.get('WORLD_SIZE')}")
    init_parallel(lay["tp"], lay["pp"], lay["vpp"], seed=a.seed)
    try:
        rc = save(a, cfg, lay) if a.cmd == "save" else load(a, cfg, lay)
    finally:
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
    return rc


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
