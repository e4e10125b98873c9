"""The naive converter the benchmark compares against: one process loads every rank file whole,
concatenates each tensor into its global form, splits it again for the target layout and saves.
This is what single-process converters do (and why they run out of memory on large models).

Only the geometry (which rank holds which slice) comes from ckptctl's planner; every byte moves
through plain torch.load / tensor copies / torch.save.

    python benchmarks/naive.py SRC DST --to tp4pp1
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from ckptctl.convert import inspect
import ckptctl.formats.legacy.files as legacy_files
import ckptctl.formats.megatron as megatron
from ckptctl.layout import parse_layout
from ckptctl.models import get_family
from ckptctl.reshard.plan import ObjectItem, plan_target


def convert(src: Path, dst: Path, to) -> dict:
    s = inspect(src)
    # 1. load everything (no mmap: the bytes are read into this process)
    sds = {fp.dirname: torch.load(Path(i["path"]), map_location="cpu", weights_only=False)
           for fp, i in zip(s.plan.files, s.inventories)}
    # 2. concatenate: every global tensor in memory
    glob = {name: torch.empty(spec["shape"], dtype=getattr(torch, spec["dtype"])) for name, spec in s.plan.arrays.items()}
    for fp in s.plan.files:
        for t in fp.tensors:
            local = sds[fp.dirname][t.chunk][t.key]
            for p, owned in zip(t.pieces, t.owned):
                if owned:
                    glob[p.array][p.gbox.slices] = local[p.local.slices].reshape(p.gbox.sizes)
    common = {k: v for k, v in sds[s.plan.files[0].dirname].items() if megatron.TOP_LEVEL_POLICY.get(k) in ("copy", "rewrite")}
    rng = sds[s.plan.files[0].dirname].get("rng_state")
    del sds
    # 3. split: every target file in memory
    files = plan_target(get_family(s.family), s.cfg, to, s.plan.manifest, s.plan.arrays, set())
    args = megatron.rewrite_args(megatron.args_dict(common["args"]), to, s.cfg.vocab_for_tp(to.tp), s.cfg.num_layers)
    out = []
    for fp in files:
        sd = {**common, "args": argparse.Namespace(**args), "rng_state": rng}
        for c in fp.chunks:
            sd[c] = {}
        for item in fp.items:
            if isinstance(item, ObjectItem):
                continue
            t = torch.zeros(item.shape, dtype=getattr(torch, item.dtype))
            for p in item.pieces:
                t[p.local.slices] = glob[p.array][p.gbox.slices].reshape(p.local.sizes)
            sd[item.chunk][item.key] = t
        out.append((fp, sd))
    # 4. save
    it = dst / megatron.iter_dirname(s.ckpt.iteration)
    for fp, sd in out:
        (it / fp.dirname).mkdir(parents=True, exist_ok=True)
        torch.save(sd, it / fp.dirname / legacy_files.MODEL_FILE)
    megatron.write_tracker(dst, s.ckpt.iteration)
    return {"files": len(out), "bytes": s.nbytes}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("src")
    ap.add_argument("dst")
    ap.add_argument("--to", required=True)
    a = ap.parse_args(argv)
    t0 = time.monotonic()
    res = convert(Path(a.src), Path(a.dst), parse_layout(a.to))
    res["seconds"] = round(time.monotonic() - t0, 3)
    print(json.dumps(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
