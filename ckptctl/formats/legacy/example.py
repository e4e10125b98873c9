"""`ckptctl example` in the legacy format: the example's global arrays written to the requested layout through
the same file builder the target phase uses, with the args, scheduler and RNG state a Megatron-LM run saves."""
from __future__ import annotations

import argparse
from pathlib import Path

from ckptctl.formats.legacy.files import MODEL_FILE
from ckptctl.formats.legacy.optim_sides import TargetSide
from ckptctl.formats.megatron import iter_dirname, make_args, rng_state, write_tracker
from ckptctl.optstate.example import EXAMPLE_ARGS
from ckptctl.reshard.plan import plan_target
from ckptctl.storage.build import build_file
from ckptctl.storage.memory import MemoryStore
from ckptctl.storage.pickles import save_pt
from ckptctl.storage.progress import Progress

ITERATION = 10


def write_example(fam, cfg, layout, out: Path, src, arrays: dict, dtype: str, seed: int, optim) -> dict:
    """Write the rank files of `layout` into the (new, empty) folder `out`. `src`: the global TP1PP1 plan of
    `arrays`; `optim`: (arrays, common, info) of the example's optimizer state, or None."""
    # The padded vocab at the example's TP: rows past the true vocab are zero, as Megatron initialises them
    # before training moves them.
    files = plan_target(fam, cfg, layout, src.manifest, src.arrays, set())
    store = MemoryStore(arrays)
    args = make_args(cfg, layout, dtype, int(cfg.extra.get("max_position_embeddings", 64)),
                     bool(cfg.extra.get("add_bias_linear", True)))
    args = argparse.Namespace(**fam.layout_args(vars(args), cfg, layout))
    common = common_state(args)
    tside = None
    if optim is not None:
        oarrays, ocommon, oinfo = optim
        vars(args).update(dict(EXAMPLE_ARGS))
        args.use_distributed_optimizer = oinfo["kind"] == "distributed"
        tside = TargetSide(fam, cfg, layout, oinfo, ocommon)
        ostore = MemoryStore(oarrays)
    it_dir = Path(out) / iter_dirname(ITERATION)
    for fp in files:
        sd = build_file(store, fp, common, {}, Progress(None, 0))
        sd["rng_state"] = [rng_state(seed + fp.coord.tp + 100 * fp.coord.pp)]
        (it_dir / fp.dirname).mkdir(parents=True)
        if tside is not None:
            tside.write(ostore, fp, sd, it_dir / fp.dirname)
        save_pt(sd, it_dir / fp.dirname / MODEL_FILE)
    write_tracker(out, ITERATION)
    return {"files": len(files), "bytes": sum(f.nbytes() for f in files)}


def common_state(args) -> dict:
    """The non-model keys of an example rank file, as a Megatron-LM run at iteration ITERATION saves them
    (benchmarks/gen_optim.py writes the same)."""
    return {"args": args, "checkpoint_version": 3.0, "iteration": ITERATION,
            # the keys Megatron-LM's OptimizerParamScheduler.state_dict() writes
            "opt_param_scheduler": {"max_lr": 3e-4, "lr_warmup_steps": 2, "num_steps": 10,
                                    "lr_decay_style": "cosine", "lr_decay_steps": 100, "min_lr": 3e-5,
                                    "start_wd": 0.1, "end_wd": 0.1, "wd_incr_style": "constant",
                                    "wd_incr_steps": 100},
            "num_floating_point_operations_so_far": 1.0e12}
