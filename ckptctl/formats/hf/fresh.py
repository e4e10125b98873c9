"""A fresh optimizer state for an imported Hugging Face model (`convert HF DST --to L --fresh-optimizer SPEC`).

"Fresh" is what a megatron-core Adam optimizer holds when its first step runs: the fp32 master of each
weight is the weight upcast, exp_avg = exp_avg_sq = 0, step 0 (torch's AdamW and TE's FusedAdam both
create zero moments and count the step from 0 then). Loaded by Megatron-LM, its first step is the step a
freshly built optimizer takes (tests/test_hf_fresh.py: bitwise, megatron-core on CPU). The state enters the
store like any source's (`optim/{param,exp_avg,exp_avg_sq}/...` at the HF folder's TP1PP1 layout), so the
generic target writers reshard and encode it for any layout, legacy or torch_dist, Adam or distributed.

The param groups keep the hyperparameters a run loads with them (torch's load_state_dict restores betas,
eps and megatron-core's max_lr / min_lr; the scheduler resets lr and weight decay each step): they come
from SPEC, `KIND[,key=value...]`, with Megatron-LM's defaults. The checkpoint is iteration 0 (not a release,
which Megatron-LM loads without optimizer), with a scheduler at step 0 and no RNG state: a run loads it with
`--override-opt_param-scheduler --no-load-rng` (convert's `next` line says so).
"""
from __future__ import annotations

from ckptctl.errors import BadInput

KINDS = ("adam", "distributed")
# Megatron-LM's defaults (arguments.py, core_v0.19.0); lr has none and is required
DEFAULTS = {"lr": None, "min_lr": 0.0, "weight_decay": 0.01, "adam_beta1": 0.9, "adam_beta2": 0.999,
            "adam_eps": 1e-8}
# DDP args that place the distributed optimizer's shards (optstate.buffers); Megatron-LM's defaults
BUFFER_ARGS = {"overlap_grad_reduce": False, "ddp_bucket_size": None, "ddp_num_buckets": None,
               "ddp_pad_buckets_for_high_nccl_busbw": False, "accumulate_allreduce_grads_in_fp32": None}
BOOL_ARGS = ("overlap_grad_reduce", "ddp_pad_buckets_for_high_nccl_busbw", "accumulate_allreduce_grads_in_fp32")
INT_ARGS = ("ddp_bucket_size", "ddp_num_buckets")
INITIAL_LOSS_SCALE = 2.0 ** 32      # Megatron-LM --initial-loss-scale default (fp16 only)
HYSTERESIS = 2
SCHEDULER_KEYS = ("max_lr", "lr_warmup_steps", "num_steps", "lr_decay_style", "lr_decay_steps", "min_lr",
                  "start_wd", "end_wd", "wd_incr_style", "wd_incr_steps")


def parse_spec(spec: str) -> tuple[str, dict]:
    """`adam,lr=3e-4,adam_beta2=0.95` -> ("adam", Megatron-LM optimizer args)."""
    kind, *rest = [x.strip() for x in str(spec).split(",")]
    if kind not in KINDS:
        raise BadInput(f"--fresh-optimizer: expected {' or '.join(KINDS)}[,key=value...], got {kind!r}")
    args = dict(DEFAULTS)
    for item in rest:
        k, eq, v = item.partition("=")
        if not eq or k not in {**DEFAULTS, **BUFFER_ARGS}:
            raise BadInput(f"--fresh-optimizer: {item!r}: expected key=value with key one of "
                           f"{', '.join({**DEFAULTS, **BUFFER_ARGS})}")
        try:
            args[k] = (v.lower() in ("1", "true", "yes")) if k in BOOL_ARGS else int(v) if k in INT_ARGS else float(v)
        except ValueError:
            raise BadInput(f"--fresh-optimizer: {k}={v!r} is not a number") from None
    if args["lr"] is None:
        raise BadInput("--fresh-optimizer: give the run's lr (e.g. adam,lr=3e-4): the param groups keep it as "
                       "max_lr, and Megatron-LM has no default")
    return kind, args


def info_of(kind: str, args: dict, cfg, dtype: str) -> dict:
    """The optimizer variant (`ckptctl.optstate.state.inspect_info`'s shape) at the HF folder's TP1PP1."""
    from ckptctl.layout import Layout
    from ckptctl.optstate.params import comps_of, n_subs
    variant = "distributed" if kind == "distributed" else ("fp32" if dtype == "float32" else "float16")
    ddp = dict(BUFFER_ARGS, **{k: args[k] for k in BUFFER_ARGS if k in args})
    if ddp["accumulate_allreduce_grads_in_fp32"] is None:    # Megatron-LM turns it on with bf16
        ddp["accumulate_allreduce_grads_in_fp32"] = dtype == "bfloat16"
    run = {"optimizer": "adam", "use_distributed_optimizer": kind == "distributed",
           **{k: v for k, v in ddp.items() if v is not None}}
    return {"kind": kind, "variant": variant, "subs": n_subs(cfg, Layout()), "comps": comps_of(kind, variant),
            "args": run, "merge": None, "experts": bool(cfg.num_experts), "fresh": True,
            "hyper": {k: v for k, v in args.items() if k in DEFAULTS}}


def common_of(info: dict, family, cfg, plan, dtype: str) -> object:
    """The layout-free `optimizer` object (param groups at step 0; the fp16 grad scaler as built)."""
    from ckptctl.optstate.example import example_groups
    hyper = info["hyper"]
    groups = example_groups(family, cfg, plan, 0, hyper["lr"], info["subs"] == 2, hyper)
    scaler = ({"scale": __import__("torch").tensor(INITIAL_LOSS_SCALE), "growth_tracker": 0,
               "hysteresis_tracker": HYSTERESIS} if dtype == "float16" else None)
    if info["kind"] == "distributed":
        subs = [{"optimizer": {"param_groups": [{**g, "step": 0.0} for g in pgs]},
                 **({"grad_scaler": scaler} if scaler is not None else {})} for pgs in groups]
        return subs[0] if len(subs) == 1 else subs
    subs = [{"param_groups": pgs, **({"grad_scaler": scaler} if scaler is not None else {})} for pgs in groups]
    return {"subs": subs, "step": 0.0}


def run_args(info: dict, dtype: str) -> dict:
    """What the checkpoint's args say of the optimizer (Megatron-LM names)."""
    return {**info["hyper"], **info["args"], "consumed_train_samples": 0, "consumed_valid_samples": 0,
            "iteration": 0, "initial_loss_scale": INITIAL_LOSS_SCALE if dtype == "float16" else None}


def scheduler_state(info: dict) -> dict:
    """A scheduler at step 0 (Megatron-LM loads one from a non-release checkpoint; the run's own schedule
    replaces these values with --override-opt_param-scheduler)."""
    h = info["hyper"]
    return {"max_lr": h["lr"], "lr_warmup_steps": 0, "num_steps": 0, "lr_decay_style": "constant",
            "lr_decay_steps": 1, "min_lr": h["min_lr"], "start_wd": h["weight_decay"], "end_wd": h["weight_decay"],
            "wd_incr_style": "constant", "wd_incr_steps": 1}


class FreshOptimSource:
    """Source phase: each worker writes its share of the state arrays (the weight upcast, zeros) from the HF
    folder in row blocks; rank 0 stores the common object."""

    BLOCK = 64 << 20      # bytes of fp32 per write

    def __init__(self, family, cfg, info: dict, plan, dtype: str, open_unit):
        self.family, self.cfg, self.info, self.plan, self.dtype = family, cfg, info, plan, dtype
        self.open_unit = open_unit       # () -> the HF folder's unit (formats.hf.source.HFUnit)

    def arrays(self) -> dict[str, dict]:
        from ckptctl.optstate.state import plan_arrays
        return plan_arrays(self.plan, self.info["comps"])

    def run(self, store, comm, progress) -> dict:
        import torch

        from ckptctl.box import Box
        from ckptctl.optstate.params import optim_array
        from ckptctl.storage.objects import OPTIM_COMMON, put_object
        unit = self.open_unit()
        weights = sorted({a.split("/", 2)[2] for a in self.arrays()})
        for name in weights[comm.rank::comm.world]:
            array = "model/" + name
            shape = tuple(self.plan.arrays[array]["shape"])
            row = max(1, int(torch.Size(shape[1:]).numel()) * 4)
            step = max(1, self.BLOCK // row)
            for r0 in range(0, shape[0], step):
                box = Box((r0,) + (0,) * (len(shape) - 1), (min(step, shape[0] - r0),) + shape[1:])
                zeros = None
                for c in self.info["comps"]:
                    if c == "param":
                        t = unit.region(array, box).float()     # the master: the weight upcast
                    else:
                        zeros = torch.zeros(box.sizes, dtype=torch.float32) if zeros is None else zeros
                        t = zeros
                    store.write(optim_array(array, c), box, t.contiguous())
                    progress.add(t.numel() * 4)
        if comm.rank != 0:
            return {}
        common = common_of(self.info, self.family, self.cfg, self.plan, self.dtype)
        return {OPTIM_COMMON: put_object(store, OPTIM_COMMON, common)}
