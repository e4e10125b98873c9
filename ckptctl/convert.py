"""`convert`: inspect and plan (no writes), run the workers, commit by rename."""
from __future__ import annotations

import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ckptctl.errors import BadInput
from ckptctl.formats import registry
from ckptctl.formats.base import Source
from ckptctl.layout import Layout
from ckptctl.models import get_family
from ckptctl.models.config import ModelConfig
from ckptctl.reshard import launch
from ckptctl.reshard.plan import plan_target
from ckptctl.reshard.run import Job
from ckptctl.store import Store


def inspect(src: Path, true_vocab: int | None = None, family: str | None = None) -> Source:
    """Read every unit's key lists (tensors stay on disk) and plan the source side, in the checkpoint's format."""
    return registry.detect(Path(src)).inspect(Path(src), true_vocab, family)


@dataclass
class ConvertReport:
    src: str
    dst: str
    family: str
    source_layout: str
    target_layout: str | None
    files_in: int
    files_out: int
    bytes: int
    seconds: float
    workers: int
    store: str | None
    policies: dict = field(default_factory=dict)
    notes: list = field(default_factory=list)
    weight_bytes: int = 0          # `bytes` = weights + optimizer state, what each phase moves
    optimizer_bytes: int = 0
    timings: dict = field(default_factory=dict)    # seconds per phase: inspect, source, target, commit
    next: dict | None = None       # ckptctl.next_flags: the Megatron-LM flags that load the result

    def to_json(self) -> dict:
        return asdict(self)


def _check_dst(dst: Path, overwrite: bool) -> None:
    occupied = any(dst.iterdir()) if dst.is_dir() else dst.exists()
    if occupied and not overwrite:
        raise BadInput(f"destination {dst} exists and is not empty (use --overwrite)")


def _commit(tmp: Path, dst: Path) -> None:
    """Rename into place: the destination appears only when complete."""
    from ckptctl.storage.commit import commit_dir
    commit_dir(tmp, dst)


def policy_report(src: Source, dst_layout: Layout | None, rng: str, optimizer: bool = True,
                  dst_format: str = "legacy", optim_sharding: str | None = None) -> dict:
    """What happens to each piece of non-weight state (DESIGN §3, §6): printed by convert, in --json."""
    from ckptctl.optstate.state import policy_text
    sfmt, dfmt = registry.get(src.fmt), registry.get(dst_format)
    if not dfmt.holds_optimizer:   # a weights-only target (Hugging Face): no other state follows the weights
        return {k: f"not written (the {dst_format} format holds weights only)" for k in sorted(src.policies)}
    out = {}
    for k, p in sorted(src.policies.items()):
        if p == "copy":
            out[k] = "copied from source rank 0"
        elif p == "rewrite":
            out[k] = "copied; parallel sizes, world size and padded_vocab_size rewritten for the target"
        elif p == "rng":
            same = dst_layout is not None and dst_layout.tp == src.layout.tp and dst_layout.pp == src.layout.pp
            out[k] = ("dropped (--rng drop)" if rng == "drop" else
                      "carried per rank (TP and PP unchanged)" if same and rng in ("auto", "carry") else
                      "replicated from source mp_rank 0 (TP or PP changed; RNG streams cannot be resharded)")
        elif p == "dropped":
            out[k] = "dropped (per-rank state that cannot follow a layout change)"
        elif p == "optimizer":
            out[k] = (policy_text(src.optim, src.layout, dst_layout, sfmt.optim_form(src.optim, src.optim.get("sharding")),
                                  dfmt.optim_form(src.optim, optim_sharding), dfmt.indices_rebuilt)
                      if optimizer and src.optim else
                      "dropped (--no-optimizer)" if src.optim else "DROPPED: not a recognised optimizer state")
    out.update(dfmt.policy_extra(src.optim, optimizer))   # state only the target format's files hold
    if "iteration" in src.policies:
        out["iteration"] = "copied (the same step count; the target resumes where the source stopped)"
    if "opt_param_scheduler" in src.policies:
        out["opt_param_scheduler"] = "copied from source rank 0 (learning-rate schedule state is layout-free)"
    if "args" in src.policies:
        out["consumed samples"] = ("args.consumed_train_samples / consumed_valid_samples copied unchanged "
                                   "(global counts, independent of the layout)")
    out["_extra_state"] = "carried when the module's shard is unchanged, else reset to the empty encoding"
    return out


def convert(src: Path, dst: Path, to: Layout | None, **kw) -> ConvertReport:
    """Convert SRC to DST inside ckptctl.safety's guard: path checks before any byte, the destination's
    lock, stale work folders of dead runs removed, free space checked, a signal stops it cleanly."""
    from ckptctl import safety
    resume, allow = kw.pop("resume", False), kw.pop("allow_divergent_replicas", False)
    with safety.guarded(src, dst, to, kw, resume) as notes, safety.divergent_replicas(allow, notes):
        rep = _convert(src, dst, to, **kw)
    if notes and isinstance(rep, ConvertReport):
        rep.notes[:0] = notes
    return rep


def _convert(src: Path, dst: Path, to: Layout | None, *, store: Path | None = None, keep_store: bool = False,
            nproc: int | None = None, true_vocab: int | None = None, rng: str = "auto",
            overwrite: bool = False, progress=None, optimizer: bool = True,
            max_memory: int | None = None, nodes: launch.Nodes | None = None,
            to_format: str | None = None, optim_sharding: str | None = None, dry_run: bool = False,
            format_options: dict | None = None, fresh_optimizer: str | None = None,
            moe_grouped_gemm: bool = False) -> ConvertReport:
    """`dry_run`: every check of a real run, then `ckptctl.dryrun.plan`'s report (a dict) instead of any write.
    `fresh_optimizer`: a source without optimizer state gets a fresh one (`Format.with_fresh_optimizer`);
    `moe_grouped_gemm`: a source without an expert layout is read with grouped experts (`with_grouped_experts`)."""
    src, dst = Path(src), Path(dst)
    nodes = nodes or launch.Nodes()
    nodes.check()
    t0 = time.monotonic()
    if nproc is None:
        nproc = launch.default_nproc()
    if src.resolve() == dst.resolve():
        raise BadInput("source and destination are the same path; ckptctl never modifies a source")
    _check_dst(dst, overwrite)
    if rng not in ("auto", "carry", "replicate", "drop"):
        raise BadInput(f"--rng: expected auto, carry, replicate or drop, got {rng!r}")
    from_store = (src / "zarr.json").is_file()
    to_store = dst.suffix == ".zarr" and to is None
    if fresh_optimizer and not optimizer:
        raise BadInput("--fresh-optimizer with --no-optimizer: give one of them")
    if from_store and (fresh_optimizer or moe_grouped_gemm):
        raise BadInput(f"{'--fresh-optimizer' if fresh_optimizer else '--moe-grouped-gemm'}: only for a Hugging Face "
                       f"source, not a store")
    if from_store:
        if to_store:
            raise BadInput(f"{src} is already a store: give a target layout with --to to write a checkpoint from it")
        return _store_to_legacy(src, dst, to, nproc, rng, progress, t0, max_memory, to_format, optim_sharding,
                                dry_run=dry_run, format_options=format_options)
    source = inspect(src, true_vocab)
    if moe_grouped_gemm:
        source = registry.get(source.fmt).with_grouped_experts(source)
    if fresh_optimizer:
        source = registry.get(source.fmt).with_fresh_optimizer(source, fresh_optimizer)
    out_fmt = _out_format(to_format, source.fmt, to)
    dfmt = registry.get(out_fmt)
    format_options = dfmt.check_format_options(format_options)
    shown = None               # how reports name the target: its layout, or a layout-free format's name
    if to is None and not to_store and dfmt.layout_free:
        to, shown = Layout(), out_fmt   # a target without a parallel layout (Hugging Face): planned as TP1PP1
    notes = []
    if optimizer and source.optim and not dfmt.holds_optimizer:
        optimizer = False
        notes.append(f"optimizer state not converted: the {out_fmt} format holds weights only")
    from ckptctl import notes as convert_notes
    notes += convert_notes.source_notes(source, to, out_fmt, true_vocab)
    optim_sharding = registry.get(out_fmt).check_options(optim_sharding)
    if to is None and not to_store:
        raise BadInput("give a target layout with --to (or a destination ending in .zarr to write only the store)")
    if to is not None:
        if to.world < 1:
            raise BadInput("bad target layout")
        from ckptctl.pipeline import resolve_target
        to = resolve_target(get_family(source.family), source.cfg, to)   # the target's pipeline split
        # Validate the whole target plan before any byte is written.
        plan_target(get_family(source.family), source.cfg, to, source.plan.manifest, source.plan.arrays,
                    set(source.plan.slots))
        registry.get(out_fmt).check_target(get_family(source.family), source.cfg, to, source.plan.manifest,
                                           source.plan.arrays, set(source.plan.slots), options=format_options)
        if optimizer and source.optim:
            from ckptctl.optstate.subopt import TargetState
            TargetState(get_family(source.family), source.cfg, to, source.optim, None)
    n = _workers(nproc, len(source.plan.files), len(to.model_files) if to else 1, nodes,
                 shared=registry.get(out_fmt).workers_share_files and not to_store)
    if nproc > 0 and n < nproc and not nodes.multi:
        notes.append(f"{n} workers, not {nproc}: at most one per rank file of the larger side "
                     f"({len(source.plan.files)} source, {len(to.model_files) if to else 1} target)")
    if dry_run:
        from ckptctl import dryrun
        return dryrun.plan(src=src, dst=dst, source_layout=source.layout, to=to, family=source.family, cfg=source.cfg,
                           out_fmt=out_fmt, src_fmt=source.fmt, weights=source.nbytes,
                           optim_info=source.optim if optimizer else None, arrays=source.plan.arrays,
                           manifest=source.plan.manifest, slots=set(source.plan.slots), store=store,
                           to_store=to_store, keep_store=keep_store, workers=n, nproc=nproc, max_memory=max_memory,
                           policies=policy_report(source, to, rng, optimizer, out_fmt, optim_sharding) if to else {},
                           notes=notes, iteration=source.ckpt.iteration)
    dst.parent.mkdir(parents=True, exist_ok=True)
    if nodes.multi:   # every node must name the same work folder on the shared filesystem
        work = dst.parent / f".{dst.name}.ckptctl-mn{nodes.master_port}"
        work.mkdir(exist_ok=True)
    else:
        from ckptctl.safety import work_folder
        work = work_folder(dst)   # new, or with --resume the one an interrupted run left
    try:
        store_path = Path(store) if store else work / "store.zarr"
        if to_store:
            store_path = work / "store.zarr"
        job = Job(workdir=str(work), store=str(store_path), family=source.family, cfg=source.cfg.to_json(),
                  src=str(src), src_layout=source.layout.to_json(), inventories=source.inventories,
                  out=str(work / "out"), dst_layout=to.to_json() if to else None, rng=rng,
                  iteration=source.ckpt.iteration, src_format=source.fmt, dist=source.dist, dst_format=out_fmt,
                  optim=source.optim if optimizer else None, max_memory=max_memory, optim_sharding=optim_sharding,
                  format_options=format_options,
                  phases=("source",) if to_store else ("source", "target"),
                  # a hidden store, deleted after the commit, references the source's bytes (storage.refs);
                  # a store the user keeps (STORE.zarr, --keep-store, --store) is self-contained
                  refs=not (to_store or keep_store or store or nodes.multi))
        from ckptctl.dryrun import optimizer_bytes
        wbytes, obytes = source.nbytes, optimizer_bytes(source.optim if optimizer else None, source.plan.arrays)
        nbytes = wbytes + obytes
        if job.refs and obytes:   # the optimizer state is rebuilt, so the referencing store copies it
            from ckptctl.paths import check_space
            check_space({dst.parent: nbytes + obytes + wbytes // 20})
        timings = {"inspect": round(time.monotonic() - t0, 3)}
        res = launch.run(job, n, nbytes * (1 if to_store else 2), progress,
                         label=f"{source.layout} -> {shown or to or 'store'}", nodes=nodes)
        timings.update({k: v["seconds"] for k, v in (res or {}).items() if isinstance(v, dict) and "seconds" in v})
        t_commit = time.monotonic()
        if nodes.node_rank != 0:   # node 0 commits once every worker has passed the final barrier
            return ConvertReport(str(src), str(dst), source.family, str(source.layout), shown or (str(to) if to else None),
                                 len(source.plan.files), 0, nbytes, round(time.monotonic() - t0, 3), n, None,
                                 {}, [f"node {nodes.node_rank} of {nodes.nnodes}: node 0 commits the output"])
        if to_store:
            _commit(store_path, dst)
        else:
            _commit(work / "out", dst)
            if keep_store and not store:
                _commit(store_path, dst.with_name(dst.name + ".zarr"))
        files_out = 0 if to_store else (res or {}).get("target", {}).get("files", 0) if shown else len(to.model_files)
        timings["commit"] = round(time.monotonic() - t_commit, 3)
        from ckptctl.next_flags import megatron_flags
        return ConvertReport(str(src), str(dst), source.family, str(source.layout), shown or (str(to) if to else None),
                             len(source.plan.files), files_out, nbytes, round(time.monotonic() - t0, 3), n,
                             str(dst if to_store else (store or (dst.with_name(dst.name + ".zarr") if keep_store else None))),
                             policy_report(source, to, rng, optimizer, out_fmt, optim_sharding) if to else {}, notes,
                             wbytes, obytes, timings,
                             None if to_store else _fresh_flags(source, megatron_flags(str(dst), to, out_fmt,
                                                                                       source.optim, optimizer, rng)))
    finally:
        if nodes.node_rank == 0:
            shutil.rmtree(work, ignore_errors=True)


def _fresh_flags(source: Source, nxt: dict | None) -> dict | None:
    """A fresh optimizer state is an iteration-0 checkpoint without RNG state, its scheduler a placeholder."""
    if nxt and source.optim and source.optim.get("fresh"):
        nxt["flags"] += ["--no-load-rng", "--override-opt_param-scheduler"]
        nxt["line"] = " ".join(nxt["flags"])
    return nxt


def _workers(nproc: int, files_in: int, files_out: int, nodes: launch.Nodes, shared: bool = False) -> int:
    """Workers a run starts: at most one per rank file of the larger side (0: in this process), or all
    `nproc` when the target format lets workers share a file (`Format.workers_share_files`)."""
    if nodes.multi or (shared and nproc > 0):
        return max(1, nproc)
    return min(nproc, max(files_in, files_out)) if nproc > 0 else 0


def _out_format(to_format: str | None, source_format: str, to: Layout | None = None) -> str:
    default = source_format
    if to is not None and registry.get(source_format).layout_free:
        default = registry.example_writer().name   # a layout asked of a layout-free source: Megatron's default format
    return registry.get(registry.canonical(to_format) or default, "--to-format").name



def _store_to_legacy(src: Path, dst: Path, to: Layout | None, nproc: int, rng: str, progress, t0,
                     max_memory: int | None = None, to_format: str | None = None,
                     optim_sharding: str | None = None, dry_run: bool = False,
                     format_options: dict | None = None) -> ConvertReport:
    st = Store.open(src)
    attrs = st.attrs
    if not attrs.get("complete"):
        raise BadInput(f"{src}: the store is incomplete")
    cfg = ModelConfig.from_json(attrs["config"])
    src_layout = Layout.from_json(attrs["source_layout"])
    to = to or src_layout
    from ckptctl.pipeline import resolve_target
    to = resolve_target(get_family(attrs["family"]), cfg, to)
    files = plan_target(get_family(attrs["family"]), cfg, to, attrs["manifest"], attrs["arrays"], set(attrs["objects"]))
    out_fmt = _out_format(to_format, attrs.get("source_format") or registry.fallback().name)
    format_options = registry.get(out_fmt).check_format_options(format_options)
    registry.get(out_fmt).check_target(get_family(attrs["family"]), cfg, to, attrs["manifest"], attrs["arrays"],
                                       set(attrs["objects"]), options=format_options)   # before any byte
    nbytes = sum(f.nbytes() for f in files)
    n = min(nproc, len(files)) if nproc > 0 else 0
    if dry_run:
        from ckptctl import dryrun
        from ckptctl.inspect_cmd import describe
        info = describe(src)
        notes = [] if n >= nproc or nproc <= 0 else [f"{n} workers, not {nproc}: at most one per target rank file"]
        return dryrun.plan(src=src, dst=dst, source_layout=src_layout, to=to, family=attrs["family"], cfg=cfg,
                           out_fmt=out_fmt, src_fmt="store", weights=info["bytes"]["weights"],
                           optim_info=attrs.get("optimizer"), arrays=attrs["arrays"], manifest=attrs["manifest"],
                           slots=set(attrs["objects"]), store=src, to_store=False, keep_store=True, workers=n,
                           nproc=nproc, max_memory=max_memory, policies={}, notes=notes, from_store=True,
                           iteration=attrs.get("iteration", "release"))
    dst.parent.mkdir(parents=True, exist_ok=True)
    from ckptctl.safety import work_folder
    work = work_folder(dst)   # new, or with --resume the one an interrupted run left
    try:
        job = Job(workdir=str(work), store=str(src), out=str(work / "out"), dst_layout=to.to_json(), rng=rng,
                  phases=("target",), max_memory=max_memory, optim_sharding=optim_sharding,
                  dst_format=out_fmt, format_options=format_options)
        timings = {"inspect": round(time.monotonic() - t0, 3)}
        res = launch.run(job, n, nbytes, progress, label=f"store -> {to}")
        timings.update({k: v["seconds"] for k, v in (res or {}).items() if isinstance(v, dict) and "seconds" in v})
        t_commit = time.monotonic()
        _commit(work / "out", dst)
        timings["commit"] = round(time.monotonic() - t_commit, 3)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    from ckptctl.next_flags import megatron_flags
    return ConvertReport(str(src), str(dst), attrs["family"], str(src_layout), str(to), 0, len(files), nbytes,
                         round(time.monotonic() - t0, 3), n, str(src), {}, timings=timings,
                         next=megatron_flags(str(dst), to, out_fmt, attrs.get("optimizer"), True, rng))
