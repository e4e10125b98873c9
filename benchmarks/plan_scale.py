"""Planner cost at frontier scale, from metadata only (no tensor data): a 61-layer MoE with 256 experts
(hidden 7168, first 3 layers dense, shared expert; GQA standing in for MLA), its rank files' key lists
synthesized as Megatron lays them out, planned tp8pp16ep64etp1 -> tp4pp8ep32etp1 (pipeline split 3/.../2
over PP16 -> 7/.../6 over PP8).

    python benchmarks/plan_scale.py [--etp-tp] [--reference] [--distopt] [--json]

The timed planning runs in a fresh process (so its peak RSS is the planner's, not the synthesis's):
seconds (wall and this process's CPU: the dev box is shared) for plan_source and plan_target, Box.intersect calls, peak RSS and the RSS after imports.
`--reference` also times the all-pairs planner of tests/plan_reference.py (the pre-issue-16 code).
"""
from __future__ import annotations

import argparse
import json
import pickle
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def config():
    from ckptctl.reshard.synth import frontier_moe   # the one synthetic-inventory rule lives in the package
    return frontier_moe()


def layouts(etp_tp: bool):
    from ckptctl.layout import Layout
    from ckptctl.pipeline import PipelineSplit
    src = Layout(tp=8, pp=16, ep=64, etp=None if etp_tp else 1)
    dst = Layout(tp=4, pp=8, ep=32, etp=None if etp_tp else 1, split=PipelineSplit(7, 6))
    return src, dst


def synthesize(etp_tp: bool):
    """Every source rank file's (key, shape, dtype) list, as the planner reads them from real files."""
    from ckptctl.models import get_family
    from ckptctl.reshard import synth
    src, _ = layouts(etp_tp)
    return synth.inventories(get_family("moe"), config(), src, "bfloat16")


def rss_mib() -> float:
    """Peak RSS of this process image. /proc's VmHWM, not getrusage's ru_maxrss: Linux carries ru_maxrss
    across exec, so a child started by the synthesizing parent would report the parent's peak."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run(path: str, etp_tp: bool, reference: bool, distopt: bool = False) -> dict:
    """The timed part (a fresh process): load the inventories, plan both sides, count intersects."""
    from ckptctl.box import Box
    from ckptctl.models import get_family
    from ckptctl.reshard import plan
    if reference:
        sys.path.insert(0, str(ROOT / "tests"))
        import plan_reference as impl
    else:
        impl = plan
    invs = pickle.loads(Path(path).read_bytes())
    fam, cfg = get_family("moe"), config()
    src, dst = layouts(etp_tp)
    after_imports = rss_mib()
    calls = [0]
    real = Box.intersect

    def counted(self, other):
        calls[0] += 1
        return real(self, other)
    Box.intersect = counted
    t0, c0 = time.perf_counter(), time.process_time()
    sp = impl.plan_source(fam, cfg, src, invs)
    t1, c1 = time.perf_counter(), time.process_time()
    files = impl.plan_target(fam, cfg, dst, sp.manifest, sp.arrays, set(sp.slots))
    t2, c2 = time.perf_counter(), time.process_time()
    plan_peak = rss_mib()      # before the optimizer side, which imports torch
    optim = {}
    if distopt:
        # the distributed optimizer's source-side plan (parameter order check, which file holds which
        # sub-optimizer's state, which file writes each region), as a convert's source phase makes it
        from ckptctl.formats.legacy.optim_sides import SourceSide
        from ckptctl.optstate.params import n_subs
        info = {"kind": "distributed", "variant": "bf16", "subs": n_subs(cfg, src), "args": {}, "merge": None,
                "experts": True, "comps": ["param", "exp_avg", "exp_avg_sq"]}
        c3 = time.process_time()
        SourceSide(fam, cfg, src, info, sp)
        optim = {"optimizer_source_cpu_s": round(time.process_time() - c3, 2),
                 "peak_rss_with_optimizer_mib": round(rss_mib())}
    return {"planner": "all-pairs reference" if reference else "sweep", "source": str(src), "target": str(dst),
            "source_files": len(invs), "target_files": len(files), "arrays": len(sp.arrays),
            "plan_source_s": round(t1 - t0, 2), "plan_target_s": round(t2 - t1, 2),
            "plan_source_cpu_s": round(c1 - c0, 2), "plan_target_cpu_s": round(c2 - c1, 2),
            "intersect_calls": calls[0], "rss_after_imports_mib": round(after_imports),
            "peak_rss_mib": round(plan_peak), **optim}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--etp-tp", action="store_true", help="ETP = TP (world 8192 source files) instead of ETP 1")
    ap.add_argument("--reference", action="store_true", help="also time the all-pairs reference planner")
    ap.add_argument("--distopt", action="store_true", help="also plan the distributed optimizer's source side")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--run", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.run:
        print(json.dumps(run(a.run, a.etp_tp, a.reference, a.distopt)))
        return 0
    t0 = time.perf_counter()
    invs = synthesize(a.etp_tp)
    synth_s = time.perf_counter() - t0
    rows = []
    with tempfile.TemporaryDirectory() as d:
        p = Path(d) / "inv.pkl"
        p.write_bytes(pickle.dumps(invs))
        for ref in ([False, True] if a.reference else [False]):
            cmd = [sys.executable, __file__, "--run", str(p)] + (["--etp-tp"] if a.etp_tp else []) + (
                ["--reference"] if ref else []) + (["--distopt"] if a.distopt and not ref else [])
            out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
            rows.append(json.loads(out.strip().splitlines()[-1]))
    if a.json:
        print(json.dumps({"synthesis_s": round(synth_s, 1), "runs": rows}, indent=1))
    else:
        print(f"synthesized {len(invs)} source key lists in {synth_s:.1f} s")
        for r in rows:
            print(f"{r['planner']:>20}: {r['source']} -> {r['target']}: plan_source {r['plan_source_s']} s "
                  f"(CPU {r['plan_source_cpu_s']} s), plan_target {r['plan_target_s']} s (CPU {r['plan_target_cpu_s']} s) ({r['target_files']} files, {r['arrays']} arrays), "
                  f"{r['intersect_calls']:,} Box.intersect, peak RSS {r['peak_rss_mib']} MiB "
                  f"({r['rss_after_imports_mib']} MiB after imports)"
                  + (f", distributed optimizer source side CPU {r['optimizer_source_cpu_s']} s (peak RSS "
                     f"{r['peak_rss_with_optimizer_mib']} MiB with torch)" if "optimizer_source_cpu_s" in r else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
