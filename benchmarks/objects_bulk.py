"""Storing and reading small objects (`_extra_state`, RNG state): one Zarr array per object (`put_object`, the
pre-issue-16 way) vs one row per source file and kind (`storage.bulk_objects`).

    python benchmarks/objects_bulk.py [--objects 10000] [--files 1024] [--skip-single] [--json]

Objects are TransformerEngine-like `_extra_state`s (a BytesIO of ~300 bytes) spread evenly over `--files`
source files, each file also with one RNG state (~10 KB, as Megatron-LM saves it). Seconds are wall and this
process's CPU (the dev box is shared); the store is on the temp folder's filesystem.
"""
from __future__ import annotations

import argparse
import io
import json
import random
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def objects(n: int, files: int):
    import numpy as np
    import torch
    rnd = random.Random(0)
    per = [n // files + (1 if f < n % files else 0) for f in range(files)]
    out = []
    for f in range(files):
        row = [(f"decoder.layers.{k}.self_attention.core_attention._extra_state|{files}|{f}",
                io.BytesIO(bytes(rnd.randrange(256) for _ in range(300)))) for k in range(per[f])]
        row.append((f"rng@mp_rank_{f:04d}", {"random_rng_state": (3, tuple(range(625)), None),
                                            "np_rng_state": ("MT19937", np.arange(624, dtype=np.uint32), 0, 0, 0.0),
                                            "torch_rng_state": torch.zeros(5056, dtype=torch.uint8),
                                            "cuda_rng_state": torch.zeros(16, dtype=torch.uint8)}))
        out.append(row)
    return out


def timed(fn):
    t0, c0 = time.perf_counter(), time.process_time()
    r = fn()
    return r, round(time.perf_counter() - t0, 2), round(time.process_time() - c0, 2)


def run(n: int, files: int, single: bool) -> dict:
    from ckptctl.storage import bulk_objects as bo
    from ckptctl.storage.objects import get_object, put_object
    from ckptctl.store import Store
    data = objects(n, files)
    total = sum(len(r) for r in data)
    res = {"objects": total, "files": files}
    with tempfile.TemporaryDirectory() as d:
        st = Store.create(Path(d) / "bulk.zarr", {}, {})

        def write_bulk():
            encs = {}
            for f, row in enumerate(data):
                w = bo.ObjectRows(st, f, files)
                for slot, v in row:
                    w.put(slot, v)
                encs.update(w.flush())
            return encs
        encs, res["bulk_write_s"], res["bulk_write_cpu_s"] = timed(write_bulk)
        fresh = Store.open(st.path)
        _, res["bulk_read_s"], res["bulk_read_cpu_s"] = timed(lambda: [get_object(fresh, s, e) for s, e in encs.items()])
        res["bulk_files"] = sum(1 for p in st.path.rglob("*") if p.is_file())
        if single:
            st1 = Store.create(Path(d) / "single.zarr", {}, {})
            encs1, res["single_write_s"], res["single_write_cpu_s"] = timed(
                lambda: {s: put_object(st1, s, v) for row in data for s, v in row})
            fresh1 = Store.open(st1.path)
            _, res["single_read_s"], res["single_read_cpu_s"] = timed(
                lambda: [get_object(fresh1, s, e) for s, e in encs1.items()])
            res["single_files"] = sum(1 for p in st1.path.rglob("*") if p.is_file())
    return res


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--objects", type=int, default=10_000, help="_extra_state objects in all")
    ap.add_argument("--files", type=int, default=1024, help="source files (one RNG state each)")
    ap.add_argument("--skip-single", action="store_true", help="skip the one-array-per-object baseline")
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args(argv)
    r = run(a.objects, a.files, not a.skip_single)
    if a.json:
        print(json.dumps(r, indent=1))
    else:
        print(f"{r['objects']:,} objects in {r['files']:,} files: bulk rows write {r['bulk_write_s']} s "
              f"(CPU {r['bulk_write_cpu_s']} s), read {r['bulk_read_s']} s (CPU {r['bulk_read_cpu_s']} s), "
              f"{r['bulk_files']:,} files on disk")
        if "single_write_s" in r:
            print(f"  one array per object: write {r['single_write_s']} s (CPU {r['single_write_cpu_s']} s), "
                  f"read {r['single_read_s']} s (CPU {r['single_read_cpu_s']} s), {r['single_files']:,} files on disk")
    return 0


if __name__ == "__main__":
    sys.exit(main())
