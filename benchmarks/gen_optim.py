"""A synthetic GPT checkpoint of a chosen size WITH distributed-optimizer state (fp32 master + Adam's two
moments, Megatron-LM's legacy `distrib_optim.pt` beside each `model_optim_rng.pt`), written rank file by
rank file (in parallel over files) without ever holding the model.

Files are written by ckptctl's own writers, as `ckptctl example gpt --optimizer distributed` writes them
(`build_file` for the model, the legacy format's optimizer `TargetSide` for `distrib_optim.pt`), so they
are what Megatron-LM saves. Only the values are cheap: element i of a global array is element
(hash(array) + i) mod POOL of one fixed pool of N(0, 0.02) values, a function of the global index alone
(whatever box a writer reads), so TP replicas are byte-identical, and the fp32 master (read from the fp32
pool at the weight's index) rounds to the bf16 weight exactly, as after a megatron-core step (convert and
verify check that). Moments are scaled pools under their own hashes.

A bf16 parameter costs 2 + 3 x 4 = 14 bytes with this state: `--size-gb` is the whole checkpoint.

    python benchmarks/gen_optim.py --size-gb 16 --layout tp2pp4dp2 --out /work/bench/src
"""
from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import shutil
import sys
import time
import zlib
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gen import plans, shape_for  # noqa: E402  (benchmarks/gen.py: model options for a size, the plans)

from ckptctl.formats.legacy.example import ITERATION, common_state  # noqa: E402
from ckptctl.formats.legacy.files import MODEL_FILE  # noqa: E402
from ckptctl.formats.legacy.optim_sides import TargetSide  # noqa: E402
from ckptctl.formats.megatron import iter_dirname, make_args, rng_state, write_tracker  # noqa: E402
from ckptctl.layout import Layout, parse_layout  # noqa: E402
from ckptctl.optstate.example import EXAMPLE_ARGS, EXAMPLE_STEP, example_groups  # noqa: E402
from ckptctl.optstate.params import OPTIM, comps_of, n_subs  # noqa: E402
from ckptctl.optstate.state import plan_arrays  # noqa: E402
from ckptctl.reshard.stream import save_streaming  # noqa: E402
from ckptctl.storage.build import build_file  # noqa: E402
from ckptctl.storage.pickles import save_pt  # noqa: E402
from ckptctl.storage.progress import Progress  # noqa: E402

POOL = 1 << 24          # elements in the value pool
BYTES_PER_PARAM = 14    # bf16 weight + fp32 master + exp_avg + exp_avg_sq


class IndexPoolStore:
    """The store interface (`read(name, box)`): element i (row-major global index) of array `name` is
    pool[(hash + i) mod POOL]. Pools are stored twice over so any run of up to POOL elements is one slice."""

    refs = None     # no source bytes to reference (ckptctl.storage.zerocopy falls back to read())

    def __init__(self, shapes: dict[str, tuple], dtypes: dict[str, torch.dtype], seed: int = 1234):
        g = torch.Generator().manual_seed(seed)
        base = torch.randn(POOL, generator=g) * 0.02
        twice = torch.cat([base, base])
        self.pools = {
            "model": {torch.bfloat16: twice.to(torch.bfloat16), torch.float16: twice.to(torch.float16),
                      torch.float32: twice},
            "param": twice,                               # the master: rounds to the model pool exactly
            "exp_avg": twice * 0.05,
            "exp_avg_sq": twice.abs() * 1e-4 + 1e-9,      # non-negative, as Adam's second moment
        }
        self.shapes, self.dtypes = shapes, dtypes

    def _pool_and_hash(self, name: str):
        if name.startswith(OPTIM):
            comp, rest = name[len(OPTIM):].split("/", 1)
            pool = self.pools[comp]
            key = "model/" + rest if comp == "param" else name   # master and weight share their index map
        else:
            pool, key = self.pools["model"][self.dtypes[name]], name
        return pool, zlib.crc32(key.encode()) % POOL

    def read(self, name, box):
        pool, h = self._pool_and_hash(name)
        shape = tuple(self.shapes[name])
        sizes, offs = tuple(box.sizes), tuple(box.offsets)
        if not shape:
            return pool[h:h + 1].reshape(())
        if len(shape) == 1:
            out, pos, n = torch.empty(sizes[0], dtype=pool.dtype), 0, sizes[0]
            start = (h + offs[0]) % POOL
            while pos < n:
                take = min(n - pos, POOL)
                out[pos:pos + take] = pool[start:start + take]
                pos, start = pos + take, (start + take) % POOL
            return out
        cols, row_len = sizes[-1], shape[-1]
        assert row_len <= POOL, f"{name}: rows of {row_len} elements are longer than the pool"
        # global row numbers of the box's rows (all leading dims flattened), then each row's pool start
        lead = np.ix_(*[np.arange(o, o + s, dtype=np.int64) for o, s in zip(offs[:-1], sizes[:-1])])
        strides = np.cumprod((1,) + shape[-2:0:-1])[::-1].astype(np.int64)
        rows = sum(ix * st for ix, st in zip(lead, strides)).reshape(-1)
        starts = (h + rows * row_len + offs[-1]) % POOL
        out = torch.empty((len(starts), cols), dtype=pool.dtype)
        # runs of rows whose starts step by exactly row_len: one strided view of the pool each
        cuts = np.flatnonzero(np.diff(starts) != row_len) + 1
        for a, b in zip(np.r_[0, cuts], np.r_[cuts, len(starts)]):
            out[a:b] = pool.as_strided((int(b - a), cols), (row_len, 1), int(starts[a]))
        return out.reshape(sizes)


def optim_common(fam, cfg, layout, src) -> tuple[dict, dict]:
    """The distributed optimizer's info and per-file common state, as `ckptctl example --optimizer
    distributed` makes them (ckptctl.optstate.example.example_state, without building the arrays)."""
    info = {"kind": "distributed", "variant": "distributed", "subs": n_subs(cfg, layout),
            "comps": comps_of("distributed", "distributed"),
            "args": {k: v for k, v in EXAMPLE_ARGS.items() if v is not None}}
    info["args"]["use_distributed_optimizer"] = True
    groups = example_groups(fam, cfg, src, EXAMPLE_STEP, 2.7e-4, info["subs"] == 2)
    subs = [{"optimizer": {"param_groups": [{**g, "step": float(EXAMPLE_STEP)} for g in pgs]}} for pgs in groups]
    return info, subs[0] if len(subs) == 1 else subs


_JOB: dict = {}     # what each forked file writer needs (set before the pool forks)


def _write_one(i: int) -> int:
    j = _JOB
    fp, store, it_dir = j["files"][i], j["store"], j["it_dir"]
    sd = build_file(store, fp, j["common"], {}, Progress(None, 0), block=64 << 20)
    sd["rng_state"] = [rng_state(1234 + fp.coord.tp + 100 * fp.coord.pp)]
    d = it_dir / fp.dirname
    d.mkdir(parents=True, exist_ok=True)
    j["tside"].write(store, fp, sd, d)          # distrib_optim.pt, and sd["optimizer"]
    n = save_streaming(sd, d / MODEL_FILE)
    return n + (d / "distrib_optim.pt").stat().st_size


def generate(out: Path, layout: Layout, opts: dict, jobs: int = 1) -> dict:
    fam, cfg, src, files = plans(layout, opts)
    dtype = opts["dtype"]
    info, ocommon = optim_common(fam, cfg, layout, src)
    arrays = {**src.arrays, **plan_arrays(src, info["comps"])}
    store = IndexPoolStore({a: tuple(s["shape"]) for a, s in arrays.items()},
                           {a: getattr(torch, s["dtype"]) for a, s in arrays.items()})
    args = make_args(cfg, layout, dtype, opts["seq"], True)
    args = argparse.Namespace(**fam.layout_args(vars(args), cfg, layout))
    vars(args).update(dict(EXAMPLE_ARGS))
    args.use_distributed_optimizer = True
    common = common_state(args)
    out = Path(out)
    if out.exists():
        shutil.rmtree(out)
    it_dir = out / iter_dirname(ITERATION)
    _JOB.update(files=files, store=store, it_dir=it_dir, common=common,
                tside=TargetSide(fam, cfg, layout, info, ocommon))
    jobs = max(1, min(jobs, len(files)))
    if jobs == 1:
        sizes = [_write_one(i) for i in range(len(files))]
    else:
        torch.set_num_threads(1)
        with multiprocessing.get_context("fork").Pool(jobs) as pool:
            sizes = pool.map(_write_one, range(len(files)), chunksize=1)
    write_tracker(out, ITERATION)
    return {"out": str(out), "layout": str(layout), "files": len(files), "bytes": sum(sizes), "options": opts,
            "optimizer": "distributed"}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size-gb", type=float, default=2.0, help="the whole checkpoint, optimizer state included")
    ap.add_argument("--layout", default="tp2pp4dp2")
    ap.add_argument("--hidden", type=int, default=None, help="default: by size (gen.shape_for)")
    ap.add_argument("--jobs", type=int, default=min(8, os.cpu_count() or 1), help="files written in parallel")
    ap.add_argument("--out", required=True)
    a = ap.parse_args(argv)
    t0 = time.monotonic()
    opts = shape_for(a.size_gb * 2 / BYTES_PER_PARAM, "bfloat16", a.hidden)
    opts["heads"] = max(opts["heads"], 8)     # small sizes: still divisible by TP up to 8
    res = generate(Path(a.out), parse_layout(a.layout), opts, a.jobs)
    res["seconds"] = round(time.monotonic() - t0, 2)
    print(json.dumps(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
