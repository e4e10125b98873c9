"""Legacy target phase (every worker): its share of the target rank files, each built from the store
(`ckptctl.storage.build`) and streamed to disk; the optimizer state encoded beside it; rank 0 writes the
tracker once every file is there."""
from __future__ import annotations

import argparse
import os
from pathlib import Path

from ckptctl.formats.legacy.files import MODEL_FILE
from ckptctl.formats.legacy.optim_sides import TargetSide
from ckptctl.formats.megatron import args_dict, iter_dirname, rewrite_args, write_tracker
import ckptctl.reshard.resume as resume
from ckptctl.reshard.comm import assign
from ckptctl.reshard.plan import plan_target
from ckptctl.reshard.stream import Budget, save_streaming
from ckptctl.storage.build import build_file
from ckptctl.storage.objects import COMMON, OPTIM_COMMON, get_object, open_target, rng_for


def target_phase(job, comm, progress) -> dict:
    store, attrs, family, cfg, src_layout, dst, encs = open_target(job)
    files = plan_target(family, cfg, dst, attrs["manifest"], attrs["arrays"], set(encs))
    common = get_object(store, COMMON, encs.get(COMMON, "none")) or {}
    iteration = attrs.get("iteration", "release")
    padded = cfg.vocab_for_tp(dst.tp) if cfg.true_vocab is not None else cfg.padded_vocab
    if "args" in common:
        common["args"] = _namespace(family.layout_args(
            rewrite_args(args_dict(common["args"]), dst, padded, cfg.num_layers), cfg, dst))
    out = Path(job.out)
    it_dir = out / iter_dirname(iteration)
    tside = None
    if attrs.get("optimizer"):
        tside = TargetSide(family, cfg, dst, attrs["optimizer"], get_object(store, OPTIM_COMMON, encs[OPTIM_COMMON]),
                           files=files)
    mine = assign([f.nbytes() + 1 for f in files], comm.world)[comm.rank]
    budget = Budget(job.max_memory)

    def prepare(i: int):
        """File i's state dict (tensors lazy) and folder, its optimizer state written beside it."""
        fp = files[i]
        sd = build_file(store, fp, common, encs, progress, block=budget.block)
        if tside is not None:
            (it_dir / fp.dirname).mkdir(parents=True, exist_ok=True)
            progress.add(tside.write(store, fp, sd, it_dir / fp.dirname, budget.block))
        slot = rng_for(job.rng, src_layout, dst, fp, encs)
        if slot is not None:
            sd["rng_state"] = get_object(store, slot, encs[slot])
        d = it_dir / fp.dirname
        d.mkdir(parents=True, exist_ok=True)
        return sd, d

    # more workers than files, all on this node: they share the files' records (never across nodes: a
    # shared file system's client caches make concurrent writes into one file unsafe to rely on)
    shared = comm.world > len(files) and os.environ.get("LOCAL_WORLD_SIZE", str(comm.world)) == str(comm.world)
    if shared:
        from ckptctl.formats.legacy.parallel_write import write_shared
        write_shared(job, comm, progress, store, files, mine, budget.block, prepare)
    for i in mine if not shared else ():
        if resume.target_done(job, i):   # finished by an interrupted run, its files intact (crc32c)
            progress.add(files[i].nbytes())
            continue
        sd, d = prepare(i)
        sums: dict = {}
        save_streaming(sd, d / MODEL_FILE, sums)
        del sd
        resume.mark_target(job, i, d, sums)
    progress.add(0, force=True)
    comm.barrier()
    if comm.rank == 0:
        write_tracker(out, iteration)
    comm.barrier()
    return {"files": len(files), "bytes": sum(f.nbytes() for f in files)}


def _namespace(d: dict):
    return argparse.Namespace(**d)
