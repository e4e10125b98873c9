"""One target-phase worker, profiled in this process: `convert SRC --to LAYOUT` runs with no worker
processes (nproc=0), the source phase unprofiled, then the target phase (every target file, one
worker) under cProfile; prints the target phase's MB/s and the functions that take its time.

    python benchmarks/prof_target.py SRC --to tp4pp1 [--to-format torch_dist] [--top 20] [--no-profile]
"""
from __future__ import annotations

import argparse
import cProfile
import json
import pstats
import shutil
import sys
import tempfile
import time
from pathlib import Path

import ckptctl.reshard.run as run
from ckptctl.convert import convert
from ckptctl.layout import parse_layout


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("src")
    ap.add_argument("--to", required=True)
    ap.add_argument("--to-format", default=None)
    ap.add_argument("--top", type=int, default=20)
    ap.add_argument("--no-profile", action="store_true", help="time only (cProfile slows Python-level loops)")
    ap.add_argument("--tmp", default=None, help="folder for the output (default: beside nothing, a temp dir)")
    a = ap.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="ckptctl-prof-", dir=a.tmp))
    prof = cProfile.Profile()
    seen = {}
    inner = run.target_phase

    def timed(job, comm, progress):
        t, c = time.monotonic(), time.process_time()
        if not a.no_profile:
            prof.enable()
        try:
            res = inner(job, comm, progress)
        finally:
            if not a.no_profile:
                prof.disable()
        seen["seconds"], seen["bytes"] = time.monotonic() - t, res.get("bytes", 0)
        seen["cpu"] = time.process_time() - c   # user + system CPU: what the phase costs, load or not
        return res

    run.target_phase = timed
    try:
        convert(Path(a.src), work / "out", parse_layout(a.to), nproc=0, to_format=a.to_format)
    finally:
        run.target_phase = inner
        shutil.rmtree(work, ignore_errors=True)
    out = {"target_s": round(seen["seconds"], 3), "bytes": seen["bytes"],
           "MB_per_s": round(seen["bytes"] / seen["seconds"] / 1e6, 1),
           "cpu_s": round(seen["cpu"], 3), "MB_per_cpu_s": round(seen["bytes"] / seen["cpu"] / 1e6, 1), "profiled": not a.no_profile}
    if not a.no_profile and a.top:
        pstats.Stats(prof).sort_stats("tottime").print_stats(a.top)
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
