"""megatron-core oracle for `convert HF_DIR DST --to L --fresh-optimizer KIND,...` (one torchrun launch, world 2,
gloo, CPU).

    torchrun --nproc-per-node 2 tests/mcore/hf_fresh.py run WORK

1. rank 0 runs ckptctl in this process: a Llama-style example (fp32 and bf16) exported to Hugging Face, then
   imported per case with a fresh optimizer state (CASES: Adam or distributed, legacy or torch_dist, TP2 or DP2);
2. per case, at its layout, megatron-core builds GPT + DDP + optimizer twice (tests/mcore/optim.py's build:
   standard param groups, the same hyperparameters as the --fresh-optimizer spec):
   - fresh: only the model weights loaded from ckptctl's files, then `reload_model_params()` (what Megatron-LM
     does with --no-load-optim: the masters copied from the weights); nothing else of ours;
   - loaded: model and optimizer loaded as Megatron-LM loads them (legacy: `optimizer.load_state_dict` and
     `load_parameter_state`; torch_dist: `dist_checkpointing.load` of the sharded state dict);
   both take step 1 on the same batch; every weight, fp32 master, exp_avg, exp_avg_sq and step must be equal
   byte for byte: loading the fresh state is a freshly built optimizer.
   Negative control (first case): the loaded state with one exp_avg element changed must give other bytes.
Rank 0 writes WORK/result.json.
"""
from __future__ import annotations

import json
import os
import sys
import traceback

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import job  # noqa: E402
import optim as mo  # noqa: E402  (build, step, local state, Megatron-LM-style loads)
from cpu import gather, init_parallel  # noqa: E402
from torch_dist_optim import sharding  # noqa: E402

CFG = dict(num_layers=2, hidden_size=64, num_attention_heads=8, num_query_groups=4, ffn_hidden_size=128,
           swiglu=True, vocab_size=100, seq_length=16, max_position_embeddings=16, position_embedding_type="rope",
           normalization="RMSNorm", add_bias_linear=False)
SPEC = ",lr={lr},min_lr={min_lr},weight_decay={weight_decay},adam_beta1={adam_beta1},adam_beta2={adam_beta2}," \
       "adam_eps={adam_eps}".format(**mo.OPT)
# case -> (optim.py kind, target format, layout)
CASES = {
    "adam_bf16_legacy_tp2": ("adam-bf16", "legacy", "tp2"),
    "dist_bf16_legacy_dp2": ("distributed-bf16", "legacy", "tp1dp2"),
    "dist_fp32_torch_dist_dp2": ("distributed", "torch_dist", "tp1dp2"),
    "adam_bf16_torch_dist_tp2": ("adam-bf16", "torch_dist", "tp2"),
}


def ckptctl_side(work: str) -> list[str]:
    """Rank 0: example -> HF -> each case's import, in this process without torchrun's variables."""
    saved = dict(os.environ)
    for k in list(os.environ):
        if k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK", "GROUP_WORLD_SIZE", "ROLE_RANK",
                 "ROLE_WORLD_SIZE", "ROLE_NAME", "MASTER_ADDR", "MASTER_PORT") or k.startswith("TORCHELASTIC_"):
            del os.environ[k]
    try:
        from ckptctl.example import example
        from ckptctl.hf import export_checkpoint, import_hf
        from ckptctl.layout import Layout, parse_layout
        for dtype in ("float32", "bfloat16"):
            opts = {"layers": CFG["num_layers"], "hidden": CFG["hidden_size"], "heads": CFG["num_attention_heads"],
                    "groups": CFG["num_query_groups"], "ffn": CFG["ffn_hidden_size"], "vocab": CFG["vocab_size"],
                    "seq": CFG["seq_length"], "swiglu": True, "position": "rope", "norm": "RMSNorm", "bias": False,
                    "dtype": dtype}
            example("gpt", Layout(), os.path.join(work, f"meg_{dtype}"), opts, optimizer="none")
            export_checkpoint(os.path.join(work, f"meg_{dtype}"), os.path.join(work, f"hf_{dtype}"), nproc=0)
        for case, (kind, fmt, lay) in CASES.items():
            opt, cfg = mo.variant(kind, CFG)
            import_hf(os.path.join(work, f"hf_{cfg.get('dtype', 'float32')}"), os.path.join(work, case),
                      parse_layout(lay), to_format=fmt, nproc=0, fresh_optimizer=opt + SPEC)
        return []
    except Exception:  # noqa: BLE001 - reported in the result
        return [traceback.format_exc()[-3000:]]
    finally:
        os.environ.clear()
        os.environ.update(saved)


def load(root: str, chunks, opt, cfg: dict, lay: dict, kind: str, fmt: str) -> None:
    """As Megatron-LM loads an iteration-0 checkpoint with its optimizer."""
    if fmt == "legacy":
        mo.load_legacy(root, chunks, opt, cfg, lay, kind)
    elif kind == "distributed":
        with sharding("dp_reshardable"):        # what ckptctl's torch_dist target writes by default
            mo.load_dist(os.path.join(root, "iter_0000000"), chunks, opt)
    else:
        mo.load_dist(os.path.join(root, "iter_0000000"), chunks, opt)


def weights_only(root: str, chunks, opt, fmt: str) -> None:
    """Megatron-LM with --no-load-optim: the model from the files, the masters from the model."""
    if fmt == "legacy":
        sd = torch.load(mo.legacy_path(root, None, 0, 0), map_location="cpu", weights_only=False)
        for k, m in zip(job.model_keys(len(chunks)), chunks):
            m.load_state_dict(sd[k], strict=True)
    else:
        from megatron.core import dist_checkpointing
        sd = {k: m.sharded_state_dict(metadata=job.dist_metadata()) for k, m in zip(job.model_keys(len(chunks)), chunks)}
        sd = dist_checkpointing.load(sd, os.path.join(root, "iter_0000000"))
        for k, m in zip(job.model_keys(len(chunks)), chunks):
            m.load_state_dict(sd[k], strict=True)
    opt.reload_model_params()


def run(work: str) -> None:
    mo.ITER = 0                                 # optim.py's legacy paths: iter_0000000
    mo.patch_optimizer_for_cpu()
    rank = torch.distributed.get_rank()
    errors = ckptctl_side(work) if rank == 0 else []
    errors = sum(gather(errors), [])
    results = {"errors": errors}
    for n, (case, (kind, fmt, lay_s)) in enumerate(CASES.items() if not errors else ()):
        opt_kind, cfg = mo.variant(kind, CFG)
        cfg = job.load_cfg(json.dumps(cfg))
        lay = job.parse_layout(lay_s)
        root = os.path.join(work, case)
        res = {"rank": rank}
        try:
            init_parallel(tp=lay["tp"], pp=lay["pp"])
            chunks, models, opt = mo.build(cfg, lay, opt_kind, 11, perturb=False)
            weights_only(root, chunks, opt, fmt)
            mo.train_step(models, opt, cfg, lay, 1)
            fresh = mo.local_state(chunks, opt)
            chunks, models, opt = mo.build(cfg, lay, opt_kind, 12, perturb=False)
            load(root, chunks, opt, cfg, lay, opt_kind, fmt)
            res["loaded_step"] = sorted({float(st["step"]) for sub in opt.chained_optimizers
                                         for st in sub.optimizer.state.values() if "step" in st})
            mo.train_step(models, opt, cfg, lay, 1)
            bad, _, count = mo.compare(mo.local_state(chunks, opt), fresh)
            res.update(mismatch=bad[:5], compared=count)
            if n == 0:        # negative control: one exp_avg element of the loaded state changed
                chunks, models, opt = mo.build(cfg, lay, opt_kind, 13, perturb=False)
                load(root, chunks, opt, cfg, lay, opt_kind, fmt)
                st = next(iter(opt.chained_optimizers[0].optimizer.state.values()))
                st["exp_avg"].view(-1)[0] += 1e-3
                mo.train_step(models, opt, cfg, lay, 1)
                res["control_mismatch"] = len(mo.compare(mo.local_state(chunks, opt), fresh)[0])
        except Exception:  # noqa: BLE001
            res["error"] = traceback.format_exc()[-3000:]
        results[case] = gather(res)
    if rank == 0:
        with open(os.path.join(work, "result.json"), "w") as f:
            json.dump(results, f, indent=1, default=str)


if __name__ == "__main__":
    from cpu import run_command
    run_command(sys.argv[1:], {"run": run})
