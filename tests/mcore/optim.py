"""megatron-core oracle for optimizer state (issue 4 item 6). Run under torchrun (gloo, CPU):

  python -m torch.distributed.run --standalone --nproc-per-node W tests/mcore/optim.py save \
      --layout tp2pp1dp2 --cfg CFG.json --work DIR [--kinds distributed,adam]
      Per kind: build GPT + DDP + get_megatron_optimizer under the layout (standard param groups, as
      Megatron-LM core_v0.19.0 builds them), take step 1 on fixed data, write DIR/<kind>/legacy exactly
      as Megatron-LM saves a legacy checkpoint (every rank: save_parameter_state into its own model
      dir; then DP-rank-0 ranks: model_optim_rng.pt with optimizer.state_dict()), the same state with
      dist_checkpointing (optimizer 'fully_reshardable') into DIR/<kind>/dist1; take step 2 on the
      next batch and save it the same way into DIR/<kind>/dist2, plus each rank's local tensors
      (DIR/<kind>/after2_<layout>_rank<r>.pt).

  python -m torch.distributed.run --standalone --nproc-per-node W tests/mcore/optim.py check \
      --layouts tp1pp1dp4,tp2pp1dp2 --base tp2pp1dp2 --cfg CFG.json --work DIR --result OUT.json
      For each layout L (same world size) and kind: load DIR/<kind>/conv-<L> (ckptctl's output) as
      Megatron-LM loads it (model strict; optimizer.load_state_dict; load_parameter_state under
      no_grad) and, independently, DIR/<kind>/dist1 through dist_checkpointing (megatron-core
      reshards master, exp_avg, exp_avg_sq itself). Compares weights, fp32 masters, exp_avg,
      exp_avg_sq and step byte for byte; takes step 2 with both and compares again byte for byte;
      compares step 2's weights and states with the base layout's step 2 (dist2 resharded by
      megatron-core): bitwise at the base layout (against after2_*), else within TOLS.

Uses none of ckptctl's code. Writes OUT.json; exits 1 on any difference.
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import cpu  # noqa: E402  (tests/mcore/cpu.py: CPU patches, legacy save tail, raw bytes, result writer)
import job  # noqa: E402  (tests/mcore/job.py: config, model, Megatron-LM args)

KINDS = ("distributed", "adam", "distributed-bf16", "adam-bf16")   # optimizer [-model dtype, default fp32]


def variant(kind: str, cfg: dict) -> tuple[str, dict]:
    """('distributed' | 'adam', the config with the kind's model dtype)."""
    opt, _, dtype = kind.partition("-")
    return opt, (dict(cfg, dtype={"bf16": "bfloat16", "fp16": "float16"}[dtype]) if dtype else cfg)
# After one further step at another TP size (fp32): the TP change alters float reduction order in the
# forward/backward, and Adam's m/sqrt(v) amplifies it where gradients are near zero. Observed: weights
# and fp32 masters 1.0e-5 absolute (lr 2.5e-4), moments 1.5e-6 relative to the tensor's largest value.
# bf16 model (fp32 masters): fp32 masters 1e-3 absolute (observed 3.9e-4: bf16 forward/backward
# rounding), bf16 weights 2e-3 absolute (observed 9.8e-4: the master's difference plus one bf16 rounding
# step), moments 5e-2 relative (observed 2.5e-2).
TOLS = {"float32": {"weight": 1e-4, "param": 1e-4, "exp_avg": 1e-5, "exp_avg_sq": 1e-5, "step": 0.0},
        "bfloat16": {"weight": 2e-3, "param": 1e-3, "exp_avg": 5e-2, "exp_avg_sq": 5e-2, "step": 0.0}}
GLOBAL_BATCH = 4
OPT = dict(lr=3e-4, min_lr=3e-5, weight_decay=0.01, adam_beta1=0.9, adam_beta2=0.95, adam_eps=1e-8,
           clip_grad=1.0)
STEP_LRS = (3e-4, 2.5e-4, 2e-4)   # lr of steps 1, 2, 3 (a scheduler's job; set by hand here)


# ----------------------------------------------------------------------------- CPU patches (optimizer)

class _CudaToCpu(torch.overrides.TorchFunctionMode):
    """device='cuda' (and cuda:N) in tensor factories -> CPU."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        d = kwargs.get("device")
        if d is not None and "cuda" in str(d):
            kwargs["device"] = "cpu"
        return func(*args, **kwargs)


def patch_optimizer_for_cpu() -> None:
    """What megatron-core's optimizers need on CPU (shared/MCORE_ON_CPU.md, 'Optimizer state')."""
    from megatron.core.optimizer import distrib_optimizer as dopt

    orig_type = torch.Tensor.type

    def type_(self, *a, **k):                 # optimizers dispatch on 'torch.cuda.FloatTensor'
        r = orig_type(self, *a, **k)
        if not a and not k and isinstance(r, str) and r.startswith("torch.") and ".cuda." not in r:
            return "torch.cuda." + r[len("torch."):]
        return r

    torch.Tensor.type = type_

    class _Stream:
        def wait_stream(self, *a, **k):
            pass

        def synchronize(self):
            pass

    torch.cuda.current_stream = lambda *a, **k: _Stream()
    torch.cuda.default_stream = lambda *a, **k: _Stream()
    torch.overrides.TorchFunctionMode.__enter__(_CudaToCpu())   # for the whole process

    # megatron-core's setter indexes the incoming dict with every key of the live state, including
    # AdamW's 'step' that distrib_optim.pt never holds: KeyError. Keep keys the file lacks untouched.
    def set_states(self, model_param, tensors):
        group_index, group_order = self.model_param_group_index_map[model_param]
        main_param = self.optimizer.param_groups[group_index]["params"][group_order]
        dst = {"param": main_param, **{k: v for k, v in self.optimizer.state[main_param].items()
                                       if torch.is_tensor(v)}}
        for k, t in dst.items():
            if k != "step" and torch.is_tensor(tensors.get(k)):
                t.copy_(tensors[k])

    dopt.DistributedOptimizer._set_main_param_and_optimizer_states = set_states


def own_steps(opt) -> None:
    """After a load megatron-core (torch AdamW path) gives every parameter the SAME step tensor, which
    AdamW then increments once per parameter per step (bias correction breaks, weights drift by
    ~lr/3). Give each parameter its own copy, as a fresh optimizer has."""
    for sub in opt.chained_optimizers:
        for st in sub.optimizer.state.values():
            if torch.is_tensor(st.get("step")):
                st["step"] = st["step"].detach().clone()


# ----------------------------------------------------------------------------- model + optimizer

def build(cfg: dict, lay: dict, kind: str, seed: int, perturb: bool):
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer, get_standard_config_overrides

    half = cfg["dtype"] != "float32"
    chunks = job.build_chunks(cfg, lay, seed, perturb=perturb)
    tconf = job.transformer_config(cfg, lay)
    ddp_conf = DistributedDataParallelConfig(grad_reduce_in_fp32=half, overlap_grad_reduce=False,
                                             use_distributed_optimizer=kind == "distributed", bucket_size=None)
    models = []
    for m in chunks:
        m.train()
        if half:     # as Megatron-LM wraps a bf16/fp16 model
            from megatron.core.transformer.module import Float16Module
            m = Float16Module(tconf, m)
        models.append(DistributedDataParallel(config=tconf, ddp_config=ddp_conf, module=m))
    oconf = OptimizerConfig(optimizer="adam", lr=OPT["lr"], min_lr=OPT["min_lr"], weight_decay=OPT["weight_decay"],
                            adam_beta1=OPT["adam_beta1"], adam_beta2=OPT["adam_beta2"], adam_eps=OPT["adam_eps"],
                            clip_grad=OPT["clip_grad"], use_distributed_optimizer=kind == "distributed",
                            bf16=cfg["dtype"] == "bfloat16", fp16=cfg["dtype"] == "float16",
                            params_dtype=job.DTYPES[cfg["dtype"]])
    opt = get_megatron_optimizer(oconf, models, config_overrides=get_standard_config_overrides(oconf))
    return chunks, models, opt


def batch(cfg: dict, lay: dict, step: int):
    """This DP rank's share of a fixed global batch of GLOBAL_BATCH sequences (tokens, labels)."""
    from megatron.core import parallel_state as ps

    s, v = cfg["seq_length"], cfg["vocab_size"]
    g = torch.Generator().manual_seed(1000 + step)
    data = torch.randint(0, v, (GLOBAL_BATCH, s + 1), generator=g)
    per = GLOBAL_BATCH // lay["dp"]
    r = ps.get_data_parallel_rank()
    mine = data[r * per:(r + 1) * per]
    return mine[:, :-1].contiguous(), mine[:, 1:].contiguous()


def train_step(models, opt, cfg: dict, lay: dict, step: int) -> None:
    """Step `step` (1-based: its batch and STEP_LRS lr) through cpu.train_step (any PP)."""
    cpu.train_step(models, opt, cfg, *batch(cfg, lay, step), STEP_LRS[step - 1])


def local_state(chunks, opt) -> list[tuple[str, torch.Tensor]]:
    """(name, tensor) of every model tensor and every optimizer tensor this rank holds, in a fixed
    order: the optimizer's own param groups (fp32 masters: DistOpt shards or the params themselves),
    exp_avg, exp_avg_sq, step."""
    out = []
    for v, m in enumerate(chunks):
        for k, t in m.state_dict().items():
            if torch.is_tensor(t):
                out.append((f"model{v}/{k}", t.detach().clone()))
    for s, sub in enumerate(opt.chained_optimizers):
        inner = sub.optimizer
        for gi, g in enumerate(inner.param_groups):
            for pi, p in enumerate(g["params"]):
                st = inner.state[p]
                out.append((f"opt{s}/g{gi}/p{pi}/param", p.detach().clone()))
                for k in ("exp_avg", "exp_avg_sq", "step"):
                    out.append((f"opt{s}/g{gi}/p{pi}/{k}", st[k].detach().clone()))
    return out


raw = cpu.raw


def compare(got, exp, tol: dict | None = None) -> tuple[list[str], dict, int]:
    """Bitwise (tol None) or within tol (per kind of tensor, see TOLS). Returns (problems, max |diff|
    per kind of tensor (model weights, fp32 master 'param', exp_avg, exp_avg_sq, step), tensors
    compared)."""
    bad, worst = [], {}
    gn, en = [n for n, _ in got], [n for n, _ in exp]
    if gn != en:
        return [f"names differ: {sorted(set(gn) ^ set(en))[:6]}"], {}, 0
    for (n, g), (_, e) in zip(got, exp):
        if g.dtype != e.dtype or g.shape != e.shape:
            bad.append(f"{n}: {g.dtype}{tuple(g.shape)} vs {e.dtype}{tuple(e.shape)}")
        elif tol is None:
            if raw(g) != raw(e):
                bad.append(f"{n}: bytes differ (max |diff| {(g.double() - e.double()).abs().max().item():.3g})")
        elif g.numel():
            # weights and fp32 masters: absolute; moments: relative to the tensor's largest value
            what = "weight" if n.startswith("model") else n.rsplit("/", 1)[1]
            diff = (g.double() - e.double()).abs()
            d = diff.max().item()
            if d != d:              # NaN: reported as inf, since max(0.0, nan) would report 0.0
                d = float("inf")
            if what in ("exp_avg", "exp_avg_sq"):
                d /= max(e.double().abs().max().item(), 1e-30)
            worst[what] = max(worst.get(what, 0.0), d)
            if not d <= tol[what]:
                bad.append(f"{n}: {'relative ' if what.startswith('exp') else ''}max |diff| {d:.3g} > {tol[what]}")
    return bad, worst, len(got)


# ----------------------------------------------------------------------------- Megatron-LM files

def megatron_args(cfg: dict, lay: dict, kind: str):
    ns = job.megatron_args(cfg, lay, "torch")
    for k, v in dict(OPT, use_distributed_optimizer=kind == "distributed", optimizer="adam",
                     accumulate_allreduce_grads_in_fp32=cfg["dtype"] != "float32",   # Megatron-LM: on with bf16 overlap_grad_reduce=False,
                     overlap_param_gather=False, ddp_bucket_size=None, ddp_num_buckets=None,
                     ddp_pad_buckets_for_high_nccl_busbw=False, decoupled_lr=None, decoupled_min_lr=None,
                     apply_wd_to_qk_layernorm=False, global_batch_size=GLOBAL_BATCH,
                     micro_batch_size=GLOBAL_BATCH // lay["dp"], iteration=1,
                     consumed_train_samples=GLOBAL_BATCH).items():
        setattr(ns, k, v)
    return ns


ITER = 1


def legacy_path(root: str, lay: dict, tp: int, pp: int) -> str:
    """This rank's file (megatron-core's parallel state is at `lay`: tp, pp are its ranks)."""
    return cpu.legacy_file(root, ITER)


def save_legacy(root: str, chunks, opt, cfg: dict, lay: dict, kind: str, seed: int) -> None:
    """Megatron-LM core_v0.19.0 `save_checkpoint`, ckpt_format torch."""
    from megatron.core import parallel_state as ps

    tp, pp = ps.get_tensor_model_parallel_rank(), ps.get_pipeline_model_parallel_rank()
    path = legacy_path(root, lay, tp, pp)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    if kind == "distributed":
        opt.save_parameter_state(os.path.join(os.path.dirname(path), "distrib_optim.pt"))

    def state():
        sd = {"args": megatron_args(cfg, lay, kind), "checkpoint_version": 3.0, "iteration": ITER}
        for key, m in zip(job.model_keys(len(chunks)), chunks):
            sd[key] = m.state_dict_for_save_checkpoint()
        sd["optimizer"] = opt.state_dict()
        sd["opt_param_scheduler"] = job.opt_param_scheduler_state()
        sd["rng_state"] = job.rng_state(seed, tp, pp)
        sd["num_floating_point_operations_so_far"] = 1.0e9
        return sd
    cpu.save_legacy(root, ITER, state)


def dist_meta() -> dict:
    return dict(job.dist_metadata(), distrib_optim_sharding_type="fully_reshardable")


def sharded(chunks, opt, is_loading: bool) -> dict:
    sd = {k: m.sharded_state_dict(metadata=job.dist_metadata()) for k, m in zip(job.model_keys(len(chunks)), chunks)}
    sd["optimizer"] = opt.sharded_state_dict(sd, is_loading=is_loading, metadata=dist_meta())
    return sd


def save_dist(path: str, chunks, opt) -> None:
    from megatron.core import dist_checkpointing

    if torch.distributed.get_rank() == 0:
        os.makedirs(path, exist_ok=True)
    torch.distributed.barrier()
    dist_checkpointing.save(sharded(chunks, opt, False), path)
    torch.distributed.barrier()


def load_dist(path: str, chunks, opt) -> None:
    """megatron-core's own resharding: model + optimizer ('fully_reshardable') from a dist checkpoint."""
    from megatron.core import dist_checkpointing

    # DistributedOptimizer.sharded_state_dict(is_loading=True) reads step from existing state
    # (torch AdamW path): allocate it with a zero-gradient step, as megatron-core's
    # _init_optimizer_states_with_dummy_values does; everything it touches is overwritten below.
    for sub in opt.chained_optimizers:
        if len(sub.optimizer.state) == 0:
            for g in sub.optimizer.param_groups:
                for p in g["params"]:
                    p.grad = torch.zeros_like(p)
            sub.optimizer.step()
            sub.optimizer.zero_grad()
    sd = dist_checkpointing.load(sharded(chunks, opt, True), path)
    for k, m in zip(job.model_keys(len(chunks)), chunks):
        m.load_state_dict(sd[k], strict=True)
    with torch.no_grad():
        opt.load_state_dict(sd["optimizer"])
    own_steps(opt)


def swap_moments(sd: dict, dsd) -> None:
    """Swap exp_avg and exp_avg_sq of every parameter in a loaded legacy file (pair)."""
    if dsd is not None:
        for k, buf in dsd.items():
            if isinstance(k, int):
                for e in buf.values():
                    e["exp_avg"], e["exp_avg_sq"] = e["exp_avg_sq"], e["exp_avg"]
    o = sd["optimizer"]
    st = o["state"] if "state" in o else o.get("optimizer", {}).get("state")
    for v in (st or {}).values():
        v["exp_avg"], v["exp_avg_sq"] = v["exp_avg_sq"], v["exp_avg"]


def load_legacy(root: str, chunks, opt, cfg: dict, lay: dict, kind: str, tamper=None) -> None:
    """Megatron-LM core_v0.19.0 `load_checkpoint`, ckpt_format torch. `tamper(sd, dist_sd)` edits
    the loaded dicts first (the negative control)."""
    from megatron.core import parallel_state as ps

    path = legacy_path(root, lay, ps.get_tensor_model_parallel_rank(), ps.get_pipeline_model_parallel_rank())
    sd = torch.load(path, map_location="cpu", weights_only=False)
    dpath = os.path.join(os.path.dirname(path), "distrib_optim.pt")
    dsd = None
    if kind == "distributed" and ps.get_data_parallel_rank() == 0:     # as load_parameter_state reads it
        dsd = torch.load(dpath, map_location="cpu", weights_only=False)
    if tamper is not None:
        tamper(sd, dsd)
    for k, m in zip(job.model_keys(len(chunks)), chunks):
        m.load_state_dict(sd[k], strict=True)
    opt.load_state_dict(sd["optimizer"])
    if kind == "distributed":
        with torch.no_grad():
            if tamper is None:
                opt.load_parameter_state(dpath)
            else:
                opt.chained_optimizers[0].load_parameter_state_from_dp_zero(dsd)
    own_steps(opt)
    args = sd["args"]
    for f, want in (("tensor_model_parallel_size", lay["tp"]), ("data_parallel_size", lay["dp"]),
                    ("padded_vocab_size", job.padded_vocab(cfg, lay["tp"]))):
        if getattr(args, f, None) != want:
            raise AssertionError(f"{path}: args.{f} = {getattr(args, f, None)!r}, expected {want!r}")


# ----------------------------------------------------------------------------- commands

def cmd_save(a, base_cfg: dict) -> int:
    lay = job.parse_layout(a.layout)
    from cpu import init_parallel
    init_parallel(lay["tp"], lay["pp"], seed=a.seed)
    rank = torch.distributed.get_rank()
    for name in a.kinds.split(","):
        d = os.path.join(a.work, name)
        kind, cfg = variant(name, base_cfg)
        chunks, models, opt = build(cfg, lay, kind, a.seed, perturb=True)
        train_step(models, opt, cfg, lay, 1)
        save_legacy(os.path.join(d, "legacy"), chunks, opt, cfg, lay, kind, a.seed)
        save_dist(os.path.join(d, "dist1"), chunks, opt)
        train_step(models, opt, cfg, lay, 2)
        save_dist(os.path.join(d, "dist2"), chunks, opt)
        torch.save(local_state(chunks, opt), os.path.join(d, f"after2_{a.layout}_rank{rank}.pt"))
        torch.distributed.barrier()
    return 0


def cmd_check(a, base_cfg: dict) -> int:
    from cpu import init_parallel

    init_parallel(1, 1, seed=a.seed)
    rank = torch.distributed.get_rank()
    rows = []
    for layout in a.layouts.split(","):
        lay = job.parse_layout(layout)
        init_parallel(lay["tp"], lay["pp"], seed=a.seed)
        for name in a.kinds.split(","):
            d = os.path.join(a.work, name)
            kind, cfg = variant(name, base_cfg)
            conv = os.path.join(d, f"conv-{layout}")
            if not os.path.isdir(conv):
                continue
            row = {"rank": rank, "layout": layout, "kind": name, "problems": []}
            # under test: ckptctl's files, loaded as Megatron-LM loads them
            chunks, models, opt = build(cfg, lay, kind, a.seed + 1, perturb=False)
            try:
                load_legacy(conv, chunks, opt, cfg, lay, kind)
            except Exception as e:  # noqa: BLE001
                row["problems"].append(f"load failed: {type(e).__name__}: {str(e)[:400]}")
                rows.append(row)
                continue
            # expected: megatron-core's own resharding of the step-1 state
            rc, rm, ro = build(cfg, lay, kind, a.seed + 2, perturb=False)
            load_dist(os.path.join(d, "dist1"), rc, ro)
            ref1 = local_state(rc, ro)
            bad, _, n = compare(local_state(chunks, opt), ref1)
            row["loaded_vs_mcore"] = {"tensors": n, "bad": bad[:8]}
            row["problems"] += [f"after load: {b}" for b in bad[:8]]
            if layout != a.base:
                # negative control: the same files with the two moments swapped must be caught
                nc, _, no = build(cfg, lay, kind, a.seed + 4, perturb=False)
                load_legacy(conv, nc, no, cfg, lay, kind, tamper=swap_moments)
                bad, _, _ = compare(local_state(nc, no), ref1)
                row["negative_control"] = len(bad)
                if not bad or any(not b.split(":")[0].endswith(("/exp_avg", "/exp_avg_sq")) for b in bad):
                    row["problems"].append(f"negative control (moments swapped) not caught as such: {bad[:4]}")
            # the next step, with both
            train_step(models, opt, cfg, lay, 2)
            train_step(rm, ro, cfg, lay, 2)
            mine = local_state(chunks, opt)
            bad, _, n = compare(mine, local_state(rc, ro))
            row["step2_vs_mcore_reshard"] = {"tensors": n, "bad": bad[:8]}
            row["problems"] += [f"after step 2 (vs megatron-core's reshard stepped here): {b}" for b in bad[:8]]
            # against the step taken at the base layout
            if layout == a.base:
                exp = torch.load(os.path.join(d, f"after2_{layout}_rank{rank}.pt"), weights_only=False)
                bad, _, n = compare(mine, exp)
                row["step2_vs_base"] = {"tensors": n, "bitwise": True, "bad": bad[:8]}
            else:
                xc, xm, xo = build(cfg, lay, kind, a.seed + 3, perturb=False)
                load_dist(os.path.join(d, "dist2"), xc, xo)
                tol = TOLS[cfg["dtype"]]
                bad, worst, n = compare(mine, local_state(xc, xo), tol)
                row["step2_vs_base"] = {"tensors": n, "tol": tol, "max_diff": worst, "bad": bad[:8]}
            row["problems"] += [f"after step 2 (vs base layout {a.base}): {b}" for b in bad[:8]]
            rows.append(row)
            torch.distributed.barrier()
    allrows = [r for rs in cpu.gather(rows) for r in rs]
    ok = bool(allrows) and not any(r["problems"] for r in allrows)
    cpu.write_result(a.result, {"ok": ok, "rows": allrows}, ok, "optim.py check")
    torch.distributed.barrier()
    return 0 if ok else 1


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    for name in ("save", "check"):
        q = sub.add_parser(name)
        q.add_argument("--cfg", required=True)
        q.add_argument("--work", required=True)
        q.add_argument("--kinds", default=",".join(KINDS))
        q.add_argument("--seed", type=int, default=1234)
        if name == "save":
            q.add_argument("--layout", required=True)
        else:
            q.add_argument("--layouts", required=True)
            q.add_argument("--base", required=True)
            q.add_argument("--result", required=True)
    a = p.parse_args(argv)
    cfg = job.load_cfg(a.cfg)
    from cpu import patch_cuda_for_cpu

    patch_cuda_for_cpu()
    patch_optimizer_for_cpu()
    try:
        rc = cmd_save(a, cfg) if a.cmd == "save" else cmd_check(a, cfg)
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.barrier()
            torch.distributed.destroy_process_group()
    return rc


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
