"""The optimizer state of `ckptctl example --optimizer`: non-zero, moments distinct from each other and from
the master, param groups as megatron-core 0.19.2 builds them (format-free: each format's example writer
encodes it)."""
from __future__ import annotations

import torch

from ckptctl.optstate.params import comps_of, file_params, n_subs
from ckptctl.optstate.state import plan_arrays

EXAMPLE_ARGS = {"optimizer": "adam", "lr": 3e-4, "min_lr": 3e-5, "weight_decay": 0.01, "adam_beta1": 0.9,
                "adam_beta2": 0.95, "adam_eps": 1e-8, "accumulate_allreduce_grads_in_fp32": True,
                "overlap_grad_reduce": False, "overlap_param_gather": False, "ddp_bucket_size": None,
                "decoupled_lr": None, "consumed_train_samples": 80, "consumed_valid_samples": 0}
EXAMPLE_STEP = 10


def default_kind(layout) -> str:
    """`ckptctl example` default: the distributed optimizer when there is data parallelism, else Adam."""
    return "distributed" if layout.dp > 1 else "adam"


def example_groups(family, cfg, src_plan, step: int, lr: float, with_expert: bool,
                   args: dict = EXAMPLE_ARGS) -> list[list[dict]]:
    """Param groups per sub-optimizer as megatron-core 0.19.2 builds them (standard overrides), read
    back from a real torch AdamW so that every field torch adds is present. `args`: the Megatron-LM
    optimizer args (lr, min_lr, weight_decay, adam_beta1/2, adam_eps)."""
    kinds = []
    for fp in src_plan.files:
        for p in file_params(family, cfg, Layout1(), fp):
            wd0 = len(p.shape) == 1 or p.key.endswith(".bias")
            e = with_expert and family.expert_of(family.locate(p.gkey).rest) is not None
            if (wd0, e) not in kinds:
                kinds.append((wd0, e))
    kinds.sort(key=lambda k: k[0])   # the no-override group first, then wd_mult=0 (stable for experts)
    subs = [[k for k in kinds if not k[1]]] + ([[k for k in kinds if k[1]]] if with_expert else [])
    out = []
    for sub in subs:
        groups = []
        for wd0, e in sub:
            g = {"params": [torch.nn.Parameter(torch.zeros(1))], "is_expert_parallel": e, "default_config": True,
                 "wd_mult": 1.0, "lr_mult": 1.0, "is_decoupled_lr": False,
                 "max_lr": args["lr"], "min_lr": args["min_lr"]}
            if wd0:
                g["wd_mult"] = 0.0
            groups.append(g)
        opt = torch.optim.AdamW(groups, lr=args["lr"], weight_decay=args["weight_decay"],
                                betas=(args["adam_beta1"], args["adam_beta2"]), eps=args["adam_eps"])
        pgs = opt.state_dict()["param_groups"]
        for g in pgs:
            g["lr"] = lr
            del g["params"]
        out.append(pgs)
    return out


def example_master(w: torch.Tensor, gen) -> torch.Tensor:
    """An fp32 master of a half-precision weight that is not the weight itself but rounds to it, as after a
    megatron-core step (weight = master rounded to nearest): noise under a fifth of the weight's ulp (|w| *
    eps < 2 ulp; a fifth of an ulp is also under half the finer ulp below a power of two)."""
    wf = w.float()
    eps = torch.finfo(w.dtype).eps
    m = wf + (torch.rand(w.shape, generator=gen) - 0.5) * 0.2 * wf.abs() * eps
    assert torch.equal(m.to(w.dtype).view(torch.int16), w.view(torch.int16)), "example master must round to the weight"
    return m


class Layout1:
    """A TP1PP1 stand-in for `file_params` on the example's global plan (no expert groups, no sharing)."""

    tp = pp = ep = expert_tp = dp = cp = edp = 1


def example_state(kind: str, family, cfg, layout, src_plan, arrays: dict, dtype: str, gen) -> tuple[dict, object, dict]:
    """Global optimizer arrays (non-zero, moments distinct from each other and from the master),
    the layout-free common state, and the optimizer variant, for `ckptctl example`."""
    variant = "distributed" if kind == "distributed" else ("fp32" if dtype == "float32" else "float16")
    info = {"kind": kind, "variant": variant, "subs": n_subs(cfg, layout),
            "comps": comps_of(kind, variant), "args": {k: v for k, v in EXAMPLE_ARGS.items() if v is not None}}
    info["args"]["use_distributed_optimizer"] = kind == "distributed"
    out = {}
    for name in plan_arrays(src_plan, info["comps"]):
        base = "model/" + name.split("/", 2)[2]
        w = arrays[base]
        comp = name.split("/")[1]
        if comp == "param":
            t = w.float() if dtype == "float32" else example_master(w, gen)
        elif comp == "exp_avg":
            t = torch.randn(w.shape, generator=gen) * 1e-3
        else:
            t = torch.rand(w.shape, generator=gen) * 1e-6 + 1e-9
        out[name] = t
    groups = example_groups(family, cfg, src_plan, EXAMPLE_STEP, 2.7e-4, info["subs"] == 2)
    scaler = {"scale": torch.tensor(65536.0), "growth_tracker": 3, "hysteresis_tracker": 2} if dtype == "float16" else None
    if kind == "distributed":
        subs = []
        for pgs in groups:
            c = {"optimizer": {"param_groups": [{**g, "step": float(EXAMPLE_STEP)} for g in pgs]}}
            if scaler is not None:
                c["grad_scaler"] = scaler
            subs.append(c)
        common = subs[0] if len(subs) == 1 else subs
    else:
        subs = [{"param_groups": pgs, **({"grad_scaler": scaler} if scaler is not None and variant == "float16" else {})}
                for pgs in groups]
        common = {"subs": subs, "step": float(EXAMPLE_STEP)}
    return out, common, info
