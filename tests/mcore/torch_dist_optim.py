"""megatron-core oracle for distributed-optimizer state in torch_dist (run under torchrun, gloo, CPU).

    torchrun --nproc-per-node 4 tests/mcore/torch_dist_optim.py WORK RESULT.json --a tp2pp1dp2 --b tp1pp1dp4

One launch does everything:
  1. at A: GPT + DDP + distributed optimizer (fp32, standard param groups), one step on fixed data;
     `dist_checkpointing.save` of model + optimizer as Megatron-LM lays out a torch_dist checkpoint,
     once `dp_reshardable` (Megatron-LM's default) -> WORK/A, once `fully_reshardable` -> WORK/A_fr;
  2. rank 0 runs `ckptctl.convert.convert` in process (single-process mode) on WORK/A: legacy at B,
     torch_dist `dp_reshardable` and `fully_reshardable` at B, and torch_dist `dp_reshardable` at A;
  3. megatron-core loads: at A, ckptctl's A -> A dp_reshardable (expected: A's own state after the step);
     at B, ckptctl's legacy files (as Megatron-LM loads them), its dp_reshardable and its fully_reshardable
     output (`dist_checkpointing.load`), each against megatron-core's own reshard of WORK/A_fr at B.
  4. the non-distributed optimizer (plain Adam, bf16 model with fp32 masters: Float16OptimizerWithFloat16Params)
     at A takes a step and saves as Megatron-LM does (no sharding type) -> WORK/A_adam; ckptctl converts it to
     torch_dist at B (B_adam) and at A (A_adam_td: keys and chunks against WORK/A_adam); megatron-core loads
     B_adam against its own reshard of WORK/A_adam at B.
Every weight, fp32 master, exp_avg, exp_avg_sq and step is compared byte for byte. Rank 0 writes RESULT.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import job  # noqa: E402  (tests/mcore/job.py: config, Megatron-LM args, state-dict keys)
import optim as mo  # noqa: E402  (tests/mcore/optim.py: GPT + DistOpt build, step, local state, legacy load)
from cpu import init_parallel, patch_cuda_for_cpu  # noqa: E402

CFG = dict(num_layers=2, hidden_size=64, num_attention_heads=8, num_query_groups=4, ffn_hidden_size=128,
           swiglu=True, vocab_size=512, seq_length=16, max_position_embeddings=16)
STEPS = 2          # the issue-10 case: two steps, then Megatron-LM's default save (fully parallel)
KIND = "distributed"
ADAM = "adam-bf16"      # tests/mcore/optim.py kind: plain Adam, bf16 model, fp32 masters


class sharding:
    """Within the block, tests/mcore/optim.py's save/load use this distributed-optimizer sharding type
    (None: none recorded, as Megatron-LM saves the non-distributed optimizer)."""

    def __init__(self, name: str):
        self.name, self.old = name, mo.dist_meta

    def __enter__(self):
        st = {"distrib_optim_sharding_type": self.name} if self.name else {}
        mo.dist_meta = lambda: dict(job.dist_metadata(), **st)

    def __exit__(self, *exc):
        mo.dist_meta = self.old


def save_megatron(root: str, chunks, opt, cfg: dict, lay: dict, st: str | None, kind: str = KIND,
                  fully_parallel: bool = True) -> None:
    """Megatron-LM core_v0.19.0 `save_checkpoint` with ckpt_format torch_dist (common args, iteration,
    scheduler, content_metadata with the sharding type; none for the non-distributed optimizer, st None)."""
    from megatron.core import dist_checkpointing

    with sharding(st):
        sd = mo.sharded(chunks, opt, False)
        meta = {k: v for k, v in mo.dist_meta().items() if k != "dp_cp_group"}
    args = mo.megatron_args(cfg, lay, kind)
    args.ckpt_format = "torch_dist"
    args.dist_ckpt_optim_fully_reshardable = st == "fully_reshardable"
    sd.update({"args": args, "checkpoint_version": 3.0, "iteration": mo.ITER,
               "opt_param_scheduler": job.opt_param_scheduler_state(), "num_floating_point_operations_so_far": 1.0e9})
    it = os.path.join(root, f"iter_{mo.ITER:07d}")
    if torch.distributed.get_rank() == 0:
        os.makedirs(it, exist_ok=True)
    torch.distributed.barrier()
    # Megatron-LM's default save path: the default torch_dist strategy wrapped by the fully parallel one over
    # the DP group (--ckpt-fully-parallel-save, on by default), which spreads the writes over the DP ranks
    # and so changes the key order of `.metadata` (issue 10)
    from megatron.core import parallel_state as ps
    from megatron.core.dist_checkpointing.serialization import get_default_save_sharded_strategy
    from megatron.core.dist_checkpointing.strategies.fully_parallel import FullyParallelSaveStrategyWrapper
    strategy = get_default_save_sharded_strategy("torch_dist")
    if fully_parallel:
        strategy = FullyParallelSaveStrategyWrapper(strategy, ps.get_data_parallel_group(with_context_parallel=True),
                                                    False)
    dist_checkpointing.save(sd, it, strategy, content_metadata=meta)
    if torch.distributed.get_rank() == 0:
        with open(os.path.join(root, "latest_checkpointed_iteration.txt"), "w") as f:
            f.write(str(mo.ITER))
    torch.distributed.barrier()


def convert_all(work: str, a: str, b: str, c: str) -> list[str]:
    """ckptctl, in this process as a single worker (no process group of its own)."""
    from ckptctl.convert import convert
    from ckptctl.layout import parse_layout

    env = {k: os.environ.pop(k) for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK") if k in os.environ}
    done = []
    try:
        for src, name, to, fmt, st in (("A", "B_legacy", b, "legacy", None),
                                       ("A", "B_dp", b, "torch_dist", "dp_reshardable"),
                                       ("A", "B_fr", b, "torch_dist", "fully_reshardable"),
                                       ("A", "A_dp", a, "torch_dist", None),
                                       ("A", "C_legacy", c, "legacy", None),
                                       ("A_fr", "C_fr_legacy", c, "legacy", None),
                                       ("A_adam", "B_adam", b, "torch_dist", None),
                                       ("A_adam", "A_adam_td", a, "torch_dist", None),
                                       ("A_adam", "C_adam_legacy", c, "legacy", None)):
            convert(os.path.join(work, src), os.path.join(work, name), parse_layout(to), nproc=0, to_format=fmt,
                    optim_sharding=st)
            done.append(name)
    finally:
        os.environ.update(env)
    return done


def load_into(path: str, chunks, opt, cfg: dict, lay: dict, how: str) -> None:
    if how in ("legacy", "adam_legacy"):
        mo.load_legacy(path, chunks, opt, cfg, lay, KIND if how == "legacy" else mo.variant(ADAM, cfg)[0])
        return
    if how == "adam":
        mo.load_dist(os.path.join(path, f"iter_{mo.ITER:07d}"), chunks, opt)
        return
    with sharding(how):
        mo.load_dist(os.path.join(path, f"iter_{mo.ITER:07d}"), chunks, opt)


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("work")
    p.add_argument("result")
    p.add_argument("--a", default="tp2pp1dp2")
    p.add_argument("--b", default="tp1pp1dp4")
    p.add_argument("--c", default="tp1pp2dp2")      # the issue-10 target (PP changes too)
    p.add_argument("--seed", type=int, default=1234)
    a = p.parse_args(argv)
    patch_cuda_for_cpu()
    mo.patch_optimizer_for_cpu()
    cfg = job.load_cfg(json.dumps(CFG))
    la = job.parse_layout(a.a)
    init_parallel(la["tp"], la["pp"], seed=a.seed)
    rank = torch.distributed.get_rank()
    rows = []

    chunks, models, opt = mo.build(cfg, la, KIND, a.seed, perturb=True)
    for step in range(1, STEPS + 1):
        mo.train_step(models, opt, cfg, la, step)
    save_megatron(os.path.join(a.work, "A"), chunks, opt, cfg, la, "dp_reshardable")
    save_megatron(os.path.join(a.work, "A_fr"), chunks, opt, cfg, la, "fully_reshardable")
    # the same state without the fully parallel strategy: same chunks, another `.metadata` key order
    save_megatron(os.path.join(a.work, "A_nfp"), chunks, opt, cfg, la, "dp_reshardable", fully_parallel=False)
    at_a = mo.local_state(chunks, opt)
    adam_kind, adam_cfg = mo.variant(ADAM, cfg)
    ac, am, ao = mo.build(adam_cfg, la, adam_kind, a.seed, perturb=True)
    for step in range(1, STEPS + 1):
        mo.train_step(am, ao, adam_cfg, la, step)
    save_megatron(os.path.join(a.work, "A_adam"), ac, ao, adam_cfg, la, None, adam_kind)
    del ac, am, ao
    err = None
    if rank == 0:
        try:
            convert_all(a.work, a.a, a.b, a.c)
        except Exception as e:  # noqa: BLE001 - reported, every rank stops below
            err = f"convert failed: {type(e).__name__}: {str(e)[:600]}"
    box = [err]
    torch.distributed.broadcast_object_list(box, src=0)
    if box[0]:
        rows.append({"rank": rank, "case": "convert", "problems": [box[0]]})
    else:
        cases = [(a.a, "A_dp", "dp_reshardable", None)] + [(a.b, n, how, "A_fr") for n, how in
                                                            (("B_legacy", "legacy"), ("B_dp", "dp_reshardable"),
                                                             ("B_fr", "fully_reshardable"))]
        cases += [(a.c, "C_legacy", "legacy", "A_fr"), (a.c, "C_fr_legacy", "legacy", "A_fr"),
                  (a.b, "B_adam", "adam", "A_adam"), (a.c, "C_adam_legacy", "adam_legacy", "A_adam")]
        ref_state: dict = {}
        for layout, name, how, ref in cases:
            lay = job.parse_layout(layout)
            init_parallel(lay["tp"], lay["pp"], seed=a.seed)
            row = {"rank": rank, "case": name, "layout": layout, "load": how, "problems": []}
            ccfg, ckind = (adam_cfg, adam_kind) if how.startswith("adam") else (cfg, KIND)
            c, _, o = mo.build(ccfg, lay, ckind, a.seed + 1, perturb=False)
            try:
                load_into(os.path.join(a.work, name), c, o, ccfg, lay, how)
            except Exception as e:  # noqa: BLE001
                row["problems"].append(f"megatron-core load failed: {type(e).__name__}: {str(e)[:600]}")
                rows.append(row)
                continue
            if ref is None:
                exp = at_a
            else:      # megatron-core's own reshard, once per layout
                if ref_state.get((layout, ref)) is None:
                    rc, _, ro = mo.build(ccfg, lay, ckind, a.seed + 2, perturb=False)
                    load_into(os.path.join(a.work, ref), rc, ro, ccfg, lay, "adam" if how.startswith("adam") else
                              "fully_reshardable")
                    ref_state[layout, ref] = mo.local_state(rc, ro)
                exp = ref_state[layout, ref]
            bad, _, n = mo.compare(mo.local_state(c, o), exp)
            row["tensors"] = n
            row["wrong_optimizer"] = sum(1 for x in bad if x.startswith("opt"))
            row["optimizer_tensors"] = sum(1 for k, _ in exp if k.startswith("opt"))
            row["problems"] += bad[:8]
            rows.append(row)
            torch.distributed.barrier()
    out = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(out, rows)
    allrows = [r for rs in out for r in rs]
    ok = bool(allrows) and not any(r["problems"] for r in allrows)
    if rank == 0:
        with open(a.result, "w") as f:
            json.dump({"ok": ok, "rows": allrows}, f, indent=1, default=str)
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
