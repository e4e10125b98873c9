"""megatron-core oracle for MoE optimizer state across a change in the number of sub-optimizers
(run under torchrun, gloo, CPU, world 2).

    torchrun --nproc-per-node 2 tests/mcore/moe_optim.py save WORK KIND...
        per KIND (distributed | adam): build the MoE GPT of tests/mcore/moe.py at A = tp1 ep2 (DP 2,
        expert DP 1: megatron-core's ChainedOptimizer has a dense and an expert sub-optimizer), wrap it
        in DDP, build get_megatron_optimizer (torch AdamW, standard param groups), take one step on
        fixed data and save WORK/KIND/A exactly as Megatron-LM core_v0.19.0 saves a legacy checkpoint
        (every rank: save_parameter_state into its own model dir; then the DP-rank-0 or expert-DP-rank-0
        ranks: model_optim_rng.pt with optimizer.state_dict()); the same state with dist_checkpointing
        (optimizer 'fully_reshardable') into WORK/KIND/dist; and as Megatron-LM's torch_dist save does by
        default (dp_reshardable / plain Adam, fully parallel save over the DP group) into WORK/KIND/td.
    torchrun --nproc-per-node 2 tests/mcore/moe_optim.py check WORK REPORT KIND...
        per KIND and per layout L in (B = tp1 ep1: one sub-optimizer, A): load WORK/KIND/conv-L (made by
        ckptctl: A -> B, and A -> B -> A) as Megatron-LM loads it (model strict; optimizer.load_state_dict;
        load_parameter_state under no_grad), and, independently, WORK/KIND/dist through dist_checkpointing
        (megatron-core reshards weights, fp32 masters, exp_avg, exp_avg_sq itself); compare every tensor
        byte for byte, and the step; at B also WORK/KIND/conv-td-B (ckptctl: td -> legacy B). Negative control at B: the expert moments swapped in ckptctl's file
        must be caught. Rank 0 writes REPORT (JSON).

Uses none of ckptctl's code: the model, the CPU patches and the optimizer helpers are imported from the
other megatron-core harness files.
"""
from __future__ import annotations

import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import job  # noqa: E402  (Megatron-LM's scheduler state)
import moe  # noqa: E402  (the MoE model, its parallel init and Megatron-LM args, CPU patches)
import optim  # noqa: E402  (optimizer CPU patches, local state listing, byte comparison, dist load)
from cpu import run_command  # noqa: E402

LAYOUTS = {"A": (1, 2, 1), "B": (1, 1, 1)}       # (tp, ep, etp), world 2: ckptctl tp1pp1ep2, tp1pp1dp2
ITER, BATCH = 1, 4


def dirname() -> str:
    from megatron.core import parallel_state as ps
    name = f"mp_rank_{ps.get_tensor_model_parallel_rank():02d}"
    if ps.get_expert_model_parallel_world_size() > 1:
        name += f"_{ps.get_expert_model_parallel_rank():03d}"
    return name


def build(name: str, kind: str, seed: int):
    """(model, DDP, optimizer) at layout `name`; parallel state initialised for it."""
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer, get_standard_config_overrides

    tp, ep, etp = LAYOUTS[name]
    moe.init(tp, ep, etp)
    model = moe.build(tp, ep, etp, seed=seed)
    dist = kind == "distributed"
    ddp = DistributedDataParallel(config=model.config, module=model, ddp_config=DistributedDataParallelConfig(
        grad_reduce_in_fp32=False, overlap_grad_reduce=False, use_distributed_optimizer=dist, bucket_size=None))
    ddp.broadcast_params()      # as Megatron-LM does: DP (and expert-DP) replicas equal
    o = optim.OPT
    conf = OptimizerConfig(optimizer="adam", lr=o["lr"], min_lr=o["min_lr"], weight_decay=o["weight_decay"],
                           adam_beta1=o["adam_beta1"], adam_beta2=o["adam_beta2"], adam_eps=o["adam_eps"],
                           clip_grad=o["clip_grad"], use_distributed_optimizer=dist, params_dtype=torch.float32)
    opt = get_megatron_optimizer(conf, [ddp], config_overrides=get_standard_config_overrides(conf))
    return model, ddp, opt


def train_step(model, ddp, opt) -> None:
    from megatron.core import parallel_state as ps

    g = torch.Generator().manual_seed(77)
    data = torch.randint(0, moe.VOCAB, (BATCH, moe.SEQ + 1), generator=g)
    r = ps.get_data_parallel_rank()
    per = BATCH // ps.get_data_parallel_world_size()
    mine = data[r * per:(r + 1) * per]
    tokens, labels = mine[:, :-1].contiguous(), mine[:, 1:].contiguous()
    pos = torch.arange(moe.SEQ).unsqueeze(0).expand_as(tokens).contiguous()
    mask = torch.triu(torch.ones(moe.SEQ, moe.SEQ), diagonal=1).bool()[None, None]
    ddp.zero_grad_buffer()
    opt.zero_grad()
    logits = ddp(tokens, pos, mask)
    torch.nn.functional.cross_entropy(logits.reshape(-1, moe.VOCAB).float(), labels.reshape(-1)).backward()
    ddp.finish_grad_sync()
    ok, _, _ = opt.step()
    assert ok, "optimizer step skipped"


def megatron_args(name: str, kind: str):
    ns = moe.megatron_args(*LAYOUTS[name])
    for k, v in dict(optim.OPT, use_distributed_optimizer=kind == "distributed", optimizer="adam",
                     accumulate_allreduce_grads_in_fp32=False, overlap_grad_reduce=False,
                     overlap_param_gather=False, ddp_bucket_size=None, ddp_num_buckets=None,
                     ddp_pad_buckets_for_high_nccl_busbw=False, decoupled_lr=None, apply_wd_to_qk_layernorm=False,
                     iteration=ITER, consumed_train_samples=BATCH).items():
        setattr(ns, k, v)
    return ns


def save_legacy(root: str, model, opt, kind: str) -> None:
    """Megatron-LM core_v0.19.0 save_checkpoint, ckpt_format torch."""
    from megatron.core import parallel_state as ps

    d = os.path.join(root, f"iter_{ITER:07d}", dirname())
    os.makedirs(d, exist_ok=True)
    torch.distributed.barrier()
    if kind == "distributed":
        opt.save_parameter_state(os.path.join(d, "distrib_optim.pt"))
    if ps.get_data_parallel_rank() == 0 or ps.get_expert_data_parallel_rank() == 0:
        torch.save({"args": megatron_args("A", kind), "checkpoint_version": 3.0, "iteration": ITER,
                    "model": model.state_dict_for_save_checkpoint(), "optimizer": opt.state_dict(),
                    "opt_param_scheduler": job.opt_param_scheduler_state()}, os.path.join(d, "model_optim_rng.pt"))
    torch.distributed.barrier()
    if torch.distributed.get_rank() == 0:
        with open(os.path.join(root, "latest_checkpointed_iteration.txt"), "w") as f:
            f.write(str(ITER))
    torch.distributed.barrier()


def load_legacy(root: str, model, opt, kind: str, tamper=None) -> None:
    """Megatron-LM core_v0.19.0 load_checkpoint, ckpt_format torch."""
    from megatron.core import parallel_state as ps

    d = os.path.join(root, f"iter_{ITER:07d}", dirname())
    sd = torch.load(os.path.join(d, "model_optim_rng.pt"), map_location="cpu", weights_only=False)
    dsd = None
    if tamper is not None:
        if kind == "distributed" and ps.get_data_parallel_rank() == 0:
            dsd = torch.load(os.path.join(d, "distrib_optim.pt"), map_location="cpu", weights_only=False)
        tamper(sd, dsd)
    model.load_state_dict(sd["model"], strict=True)
    opt.load_state_dict(sd["optimizer"])
    if kind == "distributed":
        with torch.no_grad():
            if tamper is None:
                opt.load_parameter_state(os.path.join(d, "distrib_optim.pt"))
            else:
                opt.chained_optimizers[0].load_parameter_state_from_dp_zero(dsd)
    optim.own_steps(opt)


def load_reference(path: str, model, opt, kind: str, row: dict) -> None:
    """megatron-core's own resharding of the dist checkpoint saved at A. Saved by two sub-optimizers and
    loaded by one (B), megatron-core 0.19.2 reshards every tensor but cannot load the result itself:
    the common part (param groups, step) keeps the saved per-sub-optimizer structure {0: dense,
    1: expert}. The reference then takes the dense sub-optimizer's common part, after checking that the
    expert one's param groups equal dense ones (step included)."""
    orig = opt.load_state_dict

    def load(state):
        if len(opt.chained_optimizers) == 1 and 0 in state:
            state = merge_common(state, kind, row)
        orig(state)
    opt.load_state_dict = load
    try:
        optim.load_dist(path, [model], opt)
    finally:
        del opt.load_state_dict


def merge_common(state: dict, kind: str, row: dict) -> dict:
    dense, expert = state[0], state[1]
    if kind == "distributed":
        dg, eg = dense["optimizer"]["param_groups"], expert["optimizer"]["param_groups"]
        out = {k: v for k, v in state.items() if not isinstance(k, int)}
        out.update({k: v for k, v in dense.items() if k not in out})
    else:
        dg, eg = dense["param_groups"], expert["param_groups"]
        out = {k: v for k, v in state.items() if not isinstance(k, int)}
        # the request's groups (megatron-core's own at B: param indices only) get the saved dense
        # groups' hyperparameters, both in megatron-core's group order
        if len(out["param_groups"]) != len(dg):
            row["problems"].append("reference: group counts differ")
        out["param_groups"] = [{**d, **r} for d, r in zip(dg, out["param_groups"])]
        if "common_step" in dense.get("state", {}):
            out["state"]["common_step"] = dense["state"]["common_step"]
            if repr(dense["state"]["common_step"]) != repr(expert["state"].get("common_step")):
                row["problems"].append("reference: dense and expert common_step differ")
    strip = lambda g: {k: v for k, v in g.items() if k not in ("params", "is_expert_parallel")}  # noqa: E731
    if any(strip(e) not in [strip(d) for d in dg] for e in eg):
        row["problems"].append("reference: an expert param group equals no dense one")
    return out


def save_td(root: str, model, opt, kind: str) -> None:
    """Megatron-LM core_v0.19.0 save_checkpoint, ckpt_format torch_dist, its defaults: the optimizer's
    sharded_state_dict (distributed: `dp_reshardable`), the scheduler, and the fully parallel save strategy
    over the DP group (--ckpt-fully-parallel-save), whose merged write plans set the `.metadata` key order."""
    from megatron.core import dist_checkpointing
    from megatron.core import parallel_state as ps
    from megatron.core.dist_checkpointing.serialization import get_default_save_sharded_strategy
    from megatron.core.dist_checkpointing.strategies.fully_parallel import FullyParallelSaveStrategyWrapper

    meta = dict(job.dist_metadata(), **({"distrib_optim_sharding_type": "dp_reshardable"} if kind == "distributed" else {}))
    sd = {"model": model.sharded_state_dict(metadata=job.dist_metadata())}
    sd["optimizer"] = opt.sharded_state_dict(sd, is_loading=False, metadata=meta)
    args = megatron_args("A", kind)
    args.ckpt_format = "torch_dist"
    sd.update({"args": args, "checkpoint_version": 3.0, "iteration": ITER,
               "opt_param_scheduler": job.opt_param_scheduler_state()})
    it = os.path.join(root, f"iter_{ITER:07d}")
    if torch.distributed.get_rank() == 0:
        os.makedirs(it, exist_ok=True)
    torch.distributed.barrier()
    strategy = FullyParallelSaveStrategyWrapper(get_default_save_sharded_strategy("torch_dist"),
                                                ps.get_data_parallel_group(with_context_parallel=True), False)
    dist_checkpointing.save(sd, it, strategy, content_metadata={k: v for k, v in meta.items() if k != "dp_cp_group"})
    if torch.distributed.get_rank() == 0:
        with open(os.path.join(root, "latest_checkpointed_iteration.txt"), "w") as f:
            f.write(str(ITER))
    torch.distributed.barrier()


def sub_summary(opt) -> list:
    return [[(len(g["params"]), g["wd_mult"], g["is_expert_parallel"]) for g in sub.optimizer.param_groups]
            for sub in opt.chained_optimizers]


def save(work: str, kinds: list[str]) -> None:
    for kind in kinds:
        model, ddp, opt = build("A", kind, seed=1234)
        assert len(opt.chained_optimizers) == 2, sub_summary(opt)
        train_step(model, ddp, opt)
        root = os.path.join(work, kind)
        save_legacy(os.path.join(root, "A"), model, opt, kind)
        optim.save_dist(os.path.join(root, "dist"), [model], opt)
        save_td(os.path.join(root, "td"), model, opt, kind)


def check(work: str, report: str, kinds: list[str]) -> None:
    rank = torch.distributed.get_rank()
    rows = []
    for kind in kinds:
        for name in ("B", "A"):
            row = {"rank": rank, "kind": kind, "layout": name, "problems": []}
            conv = os.path.join(work, kind, f"conv-{name}")
            model, _, opt = build(name, kind, seed=7)
            row["subs"] = len(opt.chained_optimizers)
            try:
                load_legacy(conv, model, opt, kind)
            except Exception as e:  # noqa: BLE001 - reported, the test fails on it
                row["problems"].append(f"load failed: {type(e).__name__}: {str(e)[:400]}")
                rows.append(row)
                continue
            ref, _, ropt = build(name, kind, seed=99)
            try:
                load_reference(os.path.join(work, kind, "dist"), ref, ropt, kind, row)
            except Exception as e:  # noqa: BLE001
                row["problems"].append(f"megatron-core reshard failed: {type(e).__name__}: {str(e)[:400]}")
                rows.append(row)
                continue
            expected = optim.local_state([ref], ropt)
            bad, _, n = optim.compare(optim.local_state([model], opt), expected)
            row["tensors"], row["bad"] = n, bad[:8]
            row["problems"] += bad[:8]
            row["steps"] = sorted({float(t) for k, t in expected if k.endswith("/step")})
            if name == "B":
                # ckptctl's legacy conversion of the torch_dist save (Megatron-LM's default) at B
                tc, _, topt = build(name, kind, seed=11)
                try:
                    load_legacy(os.path.join(work, kind, "conv-td-B"), tc, topt, kind)
                    tbad, _, row["td_tensors"] = optim.compare(optim.local_state([tc], topt), expected)
                    row["problems"] += [f"from torch_dist: {b}" for b in tbad[:8]]
                except Exception as e:  # noqa: BLE001
                    row["problems"].append(f"from torch_dist: load failed: {type(e).__name__}: {str(e)[:400]}")
                nc, _, nopt = build(name, kind, seed=5)
                load_legacy(conv, nc, nopt, kind, tamper=optim.swap_moments)
                nbad, _, _ = optim.compare(optim.local_state([nc], nopt), expected)
                row["negative_control"] = len(nbad)
                if not nbad:
                    row["problems"].append("negative control (moments swapped) not caught")
            rows.append(row)
            torch.distributed.barrier()
    gathered = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(gathered, rows)
    if rank == 0:
        with open(report, "w") as f:
            json.dump([r for rs in gathered for r in rs], f, indent=1, default=str)


def main(argv: list[str]) -> None:
    run_command(argv, {"save": lambda out, *a: save(out, list(a)),
                       "check": lambda root, report, *a: check(root, report, list(a))},
                setup=(optim.patch_optimizer_for_cpu,))


if __name__ == "__main__":
    main(sys.argv[1:])
