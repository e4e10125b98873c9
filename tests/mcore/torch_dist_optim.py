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
Every weight, fp32 master, exp_avg, exp_avg_sq and step is compared byte for byte. Then every loaded copy
takes step NEXT = 3 on a fixed batch (cpu.train_step, any PP), as tests/mcore/optim.py's oracle takes step 2:
bitwise against the same step from megatron-core's reshard loaded at that layout (at A: the live model's own
step 3); against A's own step 3 (WORK/A_fr_next, WORK/A_adam_next, resharded by megatron-core) within
optim.TOLS at B and C, bitwise at A. Negative control: C_legacy with its moments swapped, or shifted by a
third of each buffer, must give other weights or masters after the step. Rank 0 writes RESULT.
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
NEXT = STEPS + 1   # the step every loaded state takes next (as tests/mcore/optim.py's step 2)
NC_CASE = "C_legacy"   # the negative control: this case's files, moments swapped, stepped
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


def shift_moments(sd: dict, dsd) -> None:
    """Both moments moved by a third of each flat buffer of a loaded legacy distrib_optim.pt: every
    element gets another parameter's state (issue 10's defect), with exp_avg_sq still >= 0 (no NaN,
    unlike swapped moments), so only the size of the step's difference can catch it."""
    for k, buf in (dsd or {}).items():
        if isinstance(k, int):
            for e in buf.values():
                for m in ("exp_avg", "exp_avg_sq"):
                    e[m] = e[m].roll(e[m].numel() // 3)


def reference(work: str, ref: str, cfg: dict, lay: dict, kind: str, seed: int, adam: bool) -> tuple:
    """megatron-core's own reshard at `lay` of WORK/ref: (its state, its state after step NEXT taken here,
    A's own step NEXT resharded here from WORK/<ref>_next)."""
    how = "adam" if adam else "fully_reshardable"
    rc, rm, ro = mo.build(cfg, lay, kind, seed + 2, perturb=False)
    load_into(os.path.join(work, ref), rc, ro, cfg, lay, how)
    loaded = mo.local_state(rc, ro)
    mo.train_step(rm, ro, cfg, lay, NEXT)
    stepped = mo.local_state(rc, ro)
    xc, _, xo = mo.build(cfg, lay, kind, seed + 3, perturb=False)
    load_into(os.path.join(work, ref + "_next"), xc, xo, cfg, lay, how)
    return loaded, stepped, mo.local_state(xc, xo)


def next_step(c, m, o, cfg: dict, lay: dict, exp_next, at_a_stepped, at_a: bool) -> dict:
    """Step NEXT from the loaded state, as tests/mcore/optim.py's oracle checks step 2: bitwise against
    the same step from megatron-core's reshard loaded at this layout; against A's own step NEXT bitwise
    at A, else within optim.TOLS (another TP/PP changes the float reduction order)."""
    mo.train_step(m, o, cfg, lay, NEXT)
    mine = mo.local_state(c, o)
    bad, _, n = mo.compare(mine, exp_next)
    out = {"next_bitwise": {"tensors": n, "bad": bad[:8]}}
    tol = None if at_a else mo.TOLS[cfg["dtype"]]
    bad, worst, n = mo.compare(mine, at_a_stepped, tol)
    out["next_vs_a"] = {"tensors": n, "bitwise": at_a, "tol": tol, "max_diff": worst, "bad": bad[:8]}
    return out


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
    # the next step at A, from the live state: what every loaded copy's next step is compared with
    mo.train_step(models, opt, cfg, la, NEXT)
    at_a_next = mo.local_state(chunks, opt)
    save_megatron(os.path.join(a.work, "A_fr_next"), chunks, opt, cfg, la, "fully_reshardable")
    del chunks, models, opt
    adam_kind, adam_cfg = mo.variant(ADAM, cfg)
    ac, am, ao = mo.build(adam_cfg, la, adam_kind, a.seed, perturb=True)
    for step in range(1, STEPS + 1):
        mo.train_step(am, ao, adam_cfg, la, step)
    save_megatron(os.path.join(a.work, "A_adam"), ac, ao, adam_cfg, la, None, adam_kind)
    mo.train_step(am, ao, adam_cfg, la, NEXT)
    save_megatron(os.path.join(a.work, "A_adam_next"), ac, ao, adam_cfg, la, None, adam_kind)
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
            c, m, o = mo.build(ccfg, lay, ckind, a.seed + 1, perturb=False)
            try:
                load_into(os.path.join(a.work, name), c, o, ccfg, lay, how)
            except Exception as e:  # noqa: BLE001
                row["problems"].append(f"megatron-core load failed: {type(e).__name__}: {str(e)[:600]}")
                rows.append(row)
                continue
            if ref is None:
                exp, exp_next, at_a_stepped = at_a, at_a_next, at_a_next
            else:      # megatron-core's own reshard, once per layout
                if ref_state.get((layout, ref)) is None:
                    ref_state[layout, ref] = reference(a.work, ref, ccfg, lay, ckind, a.seed, how.startswith("adam"))
                exp, exp_next, at_a_stepped = ref_state[layout, ref]
            bad, _, n = mo.compare(mo.local_state(c, o), exp)
            row["tensors"] = n
            row["wrong_optimizer"] = sum(1 for x in bad if x.startswith("opt"))
            row["optimizer_tensors"] = sum(1 for k, _ in exp if k.startswith("opt"))
            row["problems"] += bad[:8]
            row.update(next_step(c, m, o, ccfg, lay, exp_next, at_a_stepped, ref is None))
            row["step_problems"] = [f"step {NEXT}: {x}" for x in row["next_bitwise"]["bad"] + row["next_vs_a"]["bad"]]
            if name == NC_CASE:
                row["negative_control_next"] = {}
                for what, tamper in (("swapped", mo.swap_moments), ("shifted", shift_moments)):
                    nc, nm, no = mo.build(ccfg, lay, ckind, a.seed + 4, perturb=False)
                    mo.load_legacy(os.path.join(a.work, name), nc, no, ccfg, lay, ckind, tamper=tamper)
                    r = next_step(nc, nm, no, ccfg, lay, exp_next, at_a_stepped, False)
                    # caught by the step itself: weights or fp32 masters off, not only the tampered moments
                    # (swapped: exp_avg_sq takes exp_avg's negative entries, the step's sqrt makes NaN weights,
                    # which optim.compare flags but reports as max_diff 0.0; shifted: finite, by size alone)
                    caught = [x for x in r["next_vs_a"]["bad"] if x.startswith("model") or "/param:" in x]
                    row["negative_control_next"][what] = {"caught": len(caught), "max_diff": r["next_vs_a"]["max_diff"]}
                    if not caught:
                        row["step_problems"].append(f"negative control (moments {what}, stepped) not caught: {r}")
            rows.append(row)
            torch.distributed.barrier()
    out = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(out, rows)
    allrows = [r for rs in out for r in rs]
    ok = bool(allrows) and not any(r["problems"] or r.get("step_problems") for r in allrows)
    if rank == 0:
        with open(a.result, "w") as f:
            json.dump({"ok": ok, "rows": allrows}, f, indent=1, default=str)
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
