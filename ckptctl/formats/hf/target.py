"""Hugging Face as a convert target: the whole export decided in the CLI process before any byte
(`check_target`), then every worker writes its share of the shards from the complete store, and rank 0
the index, config.json and generation_config.json (`target_phase`)."""
from __future__ import annotations

from pathlib import Path

from ckptctl.errors import BadInput
from ckptctl.formats.hf import arch as archmod
from ckptctl.formats.hf import files
from ckptctl.formats.hf.names import check_covered, entries

OPTIONS = {"shard_size": "maximum shard size (default 5GB, as transformers)",
           "dtype": "float32, bfloat16 or float16 (default: the checkpoint's)",
           "arch": f"Hugging Face model_type: {', '.join(archmod.ARCHS)} (default: from the model)",
           "bos_token_id": "generation config", "eos_token_id": "generation config"}


def check_options(opts: dict | None) -> dict:
    opts = dict(opts or {})
    bad = sorted(set(opts) - set(OPTIONS))
    if bad:
        raise BadInput(f"Hugging Face target option {bad[0]!r}: expected one of {', '.join(OPTIONS)}")
    if "shard_size" in opts:
        files.parse_size(opts["shard_size"])
    from ckptctl.formats.hf.export import DTYPES
    if opts.get("dtype") not in (None, *DTYPES):
        raise BadInput(f"dtype: expected one of {', '.join(DTYPES)}, got {opts['dtype']!r}")
    if opts.get("arch") is not None and opts["arch"] not in archmod.ARCHS:
        raise BadInput(f"arch: expected one of {', '.join(archmod.ARCHS)}, got {opts['arch']!r}")
    for k in ("bos_token_id", "eos_token_id"):
        if k in opts:
            opts[k] = int(opts[k])
    return opts


def check_target(family, cfg, arrays: dict, opts: dict | None = None) -> None:
    """The refusals (`arch=` included) and the name map's coverage, from the source's config and array list
    (no store yet): convert runs it in the CLI process, so a refusal is one line before any output."""
    opts = opts or {}
    a = archmod.choose(family.name, cfg, dict(cfg.extra), opts.get("arch"))
    V = cfg.true_vocab
    if V is None:
        raise BadInput("the true vocabulary size is unknown (args.vocab_size is None): pass --true-vocab-size N")
    check_covered(entries(a, cfg, arrays, V), arrays, a)


def plan_of(job):
    """The export plan of a convert job, from its complete store and the target options."""
    from ckptctl.formats.hf.export import DEFAULT_SHARD, Plan
    o = check_options(getattr(job, "format_options", None))
    return Plan(Path(job.store), None, o.get("dtype"), o.get("arch"), o.get("shard_size", DEFAULT_SHARD),
                {k: o[k] for k in ("bos_token_id", "eos_token_id") if k in o})


def target_phase(job, comm, progress) -> dict:
    from math import prod

    from ckptctl.formats.hf.export import write_folder_files, write_shards
    from ckptctl.reshard.comm import assign
    plan = plan_of(job)
    out = Path(job.out)
    out.mkdir(parents=True, exist_ok=True)
    item = {"float32": 4, "bfloat16": 2, "float16": 2}[plan.dtype]
    sizes = [sum(prod(plan.shapes[n]) * item for n in s) for s in plan.shards]
    mine = assign(sizes, comm.world)[comm.rank]
    write_shards(plan, out, mine)
    progress.add(sum(sizes[i] for i in mine), force=True)
    comm.barrier()
    if comm.rank == 0:
        write_folder_files(plan, out)
    comm.barrier()
    return {"files": len(plan.shards), "bytes": plan.total}
