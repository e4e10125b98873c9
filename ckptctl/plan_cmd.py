"""`ckptctl plan CONFIG --from L1 --to L2`: what converting a model of that config would take, with no
checkpoint: source and target files, store arrays, bytes (weights and optimizer state), objects, the
memory a worker holds and a time projection for N nodes x W workers.

The source files' key lists are synthesized from the config (`reshard.synth`: the global model planned
onto the source layout's files) and planned by the same planner a convert runs (`plan_source` on those
lists, `plan_target` for the target), so the counts are the ones a convert of a real checkpoint of that
model would see. Pure: no torch, no zarr.
"""
from __future__ import annotations

import resource
import time
from pathlib import Path

from ckptctl.layout import Layout
from ckptctl.plan_config import PlanInput, load
from ckptctl.plan_project import measure_rate, project

GB = 1e9


def _volume(shape) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def _layout_json(layout: Layout) -> dict:
    return {"name": str(layout), "world_size": layout.world, **layout.to_json(), "etp": layout.expert_tp}


def _rss() -> int:
    """Peak RSS of this process image (VmHWM; getrusage's ru_maxrss survives exec, so it may be a parent's)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _optim_elems(fp, flags, optim_arrays: set[str], expert_arrays: set[str], owned: bool) -> int:
    """fp32 optimizer elements a file holds: its parameters' elements (`owned`: only the pieces it writes to
    the store), only for the sub-optimizers (dense, expert) whose DP-rank-0 writer it is (`flags`; Adam:
    every parameter). Buffers (router.expert_bias ...) have no optimizer state."""
    n = 0
    for t in fp.tensors:
        for j, p in enumerate(t.pieces):
            if (owned and not t.owned[j]) or p.array not in optim_arrays:
                continue
            if flags[1 if p.array in expert_arrays else 0]:
                n += p.local.volume
    return n


def _has_state(fam, array: str) -> bool:
    # the whole array name: the rule looks at its end (an expert array's name is no key `locate` accepts)
    return fam.optimizer_state(array.removeprefix("model/"))


def compute(inp: PlanInput, src: Layout, to: Layout) -> dict:
    from ckptctl.core.dtypes import itemsize
    from ckptctl.models import get_family
    from ckptctl.optstate.buffers import writer_flags
    from ckptctl.pipeline import resolve_target
    from ckptctl.reshard import plan, synth
    fam, cfg = get_family(inp.family), inp.cfg
    fam.validate(cfg, src)
    dst = resolve_target(fam, cfg, to)
    rss0, c0 = _rss(), time.process_time()
    invs = synth.inventories(fam, cfg, src, inp.dtype)
    c1 = time.process_time()
    sp = plan.plan_source(fam, cfg, src, invs)
    del invs            # a worker holds the plan, not the key lists: freed before the target is planned
    tfiles = plan.plan_target(fam, cfg, dst, sp.manifest, sp.arrays, set(sp.slots))
    c2 = time.process_time()
    rss1 = _rss()
    arrays = sp.arrays
    elems = sum(_volume(a["shape"]) for a in arrays.values())
    weight_bytes = sum(_volume(a["shape"]) * itemsize(a["dtype"]) for a in arrays.values())
    optim_arrays = {a for a in arrays if _has_state(fam, a)}
    optim_elems = sum(_volume(arrays[a]["shape"]) for a in optim_arrays)
    expert_arrays = {a for a in arrays if ".experts." in a}
    ncomp = len(inp.optim_comps)
    dist = inp.optim_kind == "distributed"

    def side(files, layout, source: bool) -> tuple[list[dict], dict]:
        rows, tot = [], {"files": len(files), "weight_bytes": 0, "optimizer_bytes": 0, "objects": 0}
        for fp in files:
            w = fp.nbytes()
            flags = writer_flags(layout, fp) if dist else (True, True)
            o = _optim_elems(fp, flags, optim_arrays, expert_arrays, False) * 4 * ncomp
            row = {"bytes": w + o, "read": w + o}
            if source:
                owned_w = sp.owned_bytes(len(rows))
                owned_o = _optim_elems(fp, (True, True), optim_arrays, expert_arrays, True) * 4 * ncomp
                row["owned"] = owned_w + owned_o
            rows.append(row)
            tot["weight_bytes"] += w
            tot["optimizer_bytes"] += o
            tot["objects"] += len(fp.objects)
        tot["largest_file_bytes"] = max((r["bytes"] for r in rows), default=0)
        return rows, tot

    srows, stot = side(sp.files, src, True)
    trows, ttot = side(tfiles, dst, False)
    largest = max(((_volume(a["shape"]) * itemsize(a["dtype"]), k) for k, a in arrays.items()), default=(0, ""))
    out = {
        "family": inp.family, "dtype": inp.dtype, "optimizer": inp.optim_kind, "optimizer_arrays": list(inp.optim_comps),
        "source_layout": _layout_json(src), "target_layout": _layout_json(dst),
        "target_split": str(dst.split) if dst.split is not None else None,
        "parameters": optim_elems, "buffer_elements": elems - optim_elems,
        "store": {"arrays": len(arrays), "optimizer_arrays": len(optim_arrays) * ncomp, "objects": len(sp.slots),
                  "weight_bytes": weight_bytes, "optimizer_bytes": optim_elems * 4 * ncomp,
                  "bytes": weight_bytes + optim_elems * 4 * ncomp},
        "source": stot, "target": ttot,
        "largest_array": {"name": largest[1].removeprefix("model/"), "bytes": largest[0]},
        "planning": {"synthesis_cpu_s": round(c1 - c0, 2), "plan_cpu_s": round(c2 - c1, 2),
                     "peak_rss_bytes": rss1, "plan_rss_bytes": max(0, rss1 - rss0)},
        "notes": list(inp.notes),
    }
    out["_rows"] = (srows, trows)
    return out


def run(config: Path, src: Layout, to: Layout, *, with_optimizer: bool, nodes: int, workers: int,
        gbps: float | None, node_gbps: float | None, measure_dir: str | None, max_memory: int | None) -> dict:
    from ckptctl.errors import BadInput
    for name, v in (("--nodes", nodes), ("--workers", workers)):
        if v < 1:
            raise BadInput(f"{name}: expected a count >= 1, got {v}")
    for name, v in (("--gbps", gbps), ("--node-gbps", node_gbps)):
        if v is not None and not v > 0:
            raise BadInput(f"{name}: expected a positive rate in GB/s, got {v}")
    inp = load(config, src.tp, with_optimizer)
    d = compute(inp, src, to)
    srows, trows = d.pop("_rows")
    if gbps is not None:
        rate, how = gbps * GB, {"given": f"--gbps {gbps}"}
    else:
        how = measure_rate(measure_dir)
        rate = how["bytes_per_s"]
    budget = max_memory or (2 << 30)
    d["memory_per_worker"] = {
        "budget_bytes": budget, "plan_bytes": d["planning"]["peak_rss_bytes"],
        "note": "each worker plans (peak RSS of this plan) and moves tensors within the budget "
                "(--max-memory; larger tensors in row blocks)",
        "fits": d["planning"]["peak_rss_bytes"] + (450 << 20) <= budget}   # + torch's import (~450 MiB)
    d["rate"] = {"bytes_per_s": rate, **how}
    plan_s = d["planning"]["plan_cpu_s"]
    d["projection"] = project(srows, trows, nodes, workers, rate, node_gbps * GB if node_gbps else None, plan_s)
    d["config"] = str(config)
    d["ok"] = True
    return d


def render(d: dict, say) -> None:
    from ckptctl.output import human_bytes as hb
    s, t, st, p = d["source"], d["target"], d["store"], d["projection"]
    say(f"plan: {d['family']} ({d['parameters']:,} parameters, {d['dtype']}) {d['source_layout']['name']} -> "
        f"{d['target_layout']['name']}" + (f" (split {d['target_split']})" if d["target_split"] else ""))
    say(f"  source      {s['files']:,} files: weights {hb(s['weight_bytes'])}, optimizer {hb(s['optimizer_bytes'])}, "
        f"{s['objects']:,} objects; largest file {hb(s['largest_file_bytes'])}")
    say(f"  store       {st['arrays']:,} weight arrays + {st['optimizer_arrays']:,} optimizer arrays ({d['optimizer'] or 'none'}), "
        f"{st['objects']:,} objects: weights {hb(st['weight_bytes'])}, optimizer {hb(st['optimizer_bytes'])}")
    say(f"  target      {t['files']:,} files: weights {hb(t['weight_bytes'])}, optimizer {hb(t['optimizer_bytes'])}, "
        f"{t['objects']:,} objects; largest file {hb(t['largest_file_bytes'])}")
    m = d["memory_per_worker"]
    say(f"  memory      {hb(m['budget_bytes'])} per worker budget; planning holds {hb(m['plan_bytes'])} "
        f"(synthesis {d['planning']['synthesis_cpu_s']} s, plan {d['planning']['plan_cpu_s']} s CPU)"
        + ("" if m["fits"] else "  OVER BUDGET with torch loaded: raise --max-memory"))
    r = d["rate"]
    say(f"  rate        {hb(r['bytes_per_s'])}/s per worker ({r.get('given') or r['how']})")
    say(f"  projection  {p['nodes']} nodes x {p['workers_per_node']} workers: {p['seconds']} s = start-up "
        f"{p['startup_s']} s + plan {p['plan_s']} s + source phase {p['source_phase']['seconds']} s "
        f"({p['source_phase']['bound']}-bound) + target phase {p['target_phase']['seconds']} s "
        f"({p['target_phase']['bound']}-bound)")
    for n in d["notes"]:
        say(f"  note: {n}")
