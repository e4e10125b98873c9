"""Where one conversion's time goes: runs `convert` in this process (no torchrun) under cProfile and
splits the time into unpickling, Zarr writes, Zarr reads, pickling, file writes and checksums.

    python benchmarks/prof.py SRC --to tp4pp1 [--top 25]
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

from ckptctl.convert import convert
from ckptctl.layout import parse_layout

# (label, file suffix, function name): cumulative time of that function
PARTS = [
    ("inspect + plan (unpickle rank-file headers)", "convert.py", "inspect"),
    ("unpickle rank files (torch.load mmap)", "legacy.py", "load_pt"),
    ("Zarr writes (source phase)", "store.py", "write"),
    ("drop mapped pages", "stream.py", "release_pages"),
    ("Zarr reads (target phase)", "store.py", "read"),
    ("write target files (all)", "stream.py", "save_streaming"),
    ("  pickling data.pkl", "pickle.py", "dump"),
    ("  file writes", "~", "<method 'write' of '_io.BufferedRandom' objects>"),
    ("  CRC-32", "~", "<built-in method zlib.crc32>"),
]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("src")
    ap.add_argument("--to", required=True)
    ap.add_argument("--top", type=int, default=0)
    a = ap.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="ckptctl-prof-"))
    prof = cProfile.Profile()
    t0 = time.monotonic()
    try:
        prof.enable()
        convert(Path(a.src), work / "out", parse_layout(a.to), nproc=0)
        prof.disable()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    wall = time.monotonic() - t0
    st = pstats.Stats(prof)
    out = {"wall_s": round(wall, 2)}
    for label, fname, func in PARTS:
        cum = sum(v[3] for (f, _, fn), v in st.stats.items() if fn == func and f.endswith(fname))
        out[label] = round(cum, 2)
    for k, v in out.items():
        print(f"{k:<48}{v:>8.2f} s")
    if a.top:
        st.sort_stats("tottime").print_stats(a.top)
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
