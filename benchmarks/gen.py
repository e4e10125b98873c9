"""A synthetic GPT checkpoint of a chosen size in Megatron's legacy format, written rank file by
rank file without ever holding the model (ckptctl.example builds every global tensor in memory).

Keys, shapes and args come from ckptctl's own GPT family (`global_keys`, `make_args`) and the target
planner, so the files are exactly what `ckptctl convert` expects. Values are cheap, not random: each
store region is a window of one fixed pool of N(0, 0.02) values, chosen by a hash of (array, box), so
TP replicas (same region) are byte-identical and different regions differ.

    python benchmarks/gen.py --size-gb 2 --layout tp2pp2 --out /work/bench/src
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
import zlib
from pathlib import Path

import numpy as np
import torch

from ckptctl.example import make_config
from ckptctl.formats.megatron import make_args, rng_state as _rng_state
import ckptctl.formats.legacy.files as legacy_files
import ckptctl.formats.megatron as megatron
from ckptctl.layout import FileCoord, Layout, parse_layout
from ckptctl.models import get_family
from ckptctl.models.config import ModelConfig, padded_vocab
from ckptctl.reshard.plan import Inventory, plan_source, plan_target
from ckptctl.storage.build import build_file
from ckptctl.storage.progress import Progress
from ckptctl.reshard.stream import save_streaming

POOL = 1 << 24     # elements in the value pool


class PoolStore:
    """The store interface (`read(name, box)`) over a fixed pool of values."""

    refs = None     # no source bytes to reference (ckptctl.storage.zerocopy falls back to read())

    def __init__(self, seed: int = 1234):
        g = torch.Generator().manual_seed(seed)
        base = torch.randn(POOL, generator=g) * 0.02
        self.pools = {torch.float32: base, torch.bfloat16: base.to(torch.bfloat16), torch.float16: base.to(torch.float16)}
        self.dtypes: dict[str, torch.dtype] = {}

    def read(self, name, box):
        pool = self.pools[self.dtypes[name]]
        n = box.volume
        start = zlib.crc32(f"{name}{box.offsets}{box.sizes}".encode()) % POOL
        out = torch.empty(n, dtype=pool.dtype)
        pos = 0
        while pos < n:
            take = min(n - pos, POOL - start)
            out[pos:pos + take] = pool[start:start + take]
            pos, start = pos + take, 0
        return out.reshape(box.sizes)


def shape_for(size_gb: float, dtype: str, hidden: int | None = None, vocab: int = 32000, seq: int = 4096) -> dict:
    """Model options (12 h^2 + 13 h per layer, embeddings and output untied) for about `size_gb` GB."""
    item = torch.empty((), dtype=getattr(torch, dtype)).element_size()
    hidden = hidden or (2048 if size_gb >= 1.5 else 1024 if size_gb >= 0.3 else 256)
    per_layer = (12 * hidden * hidden + 13 * hidden) * item
    fixed = (2 * padded_vocab(vocab, 128, 1) * hidden + seq * hidden + 2 * hidden) * item
    layers = max(4, 4 * round((size_gb * 1e9 - fixed) / per_layer / 4))   # divisible by PP 1, 2, 4
    return {"layers": layers, "hidden": hidden, "heads": hidden // 128, "ffn": 4 * hidden, "vocab": vocab,
            "seq": seq, "dtype": dtype}


def plans(layout: Layout, opts: dict) -> tuple:
    """(family, config at `layout`'s TP, the global TP1PP1 source plan, the target files of `layout`) of a GPT
    with model options `opts` (gen_optim.py's too)."""
    fam = get_family("gpt")
    cfg = make_config("gpt", opts)
    cfg = ModelConfig(**{**cfg.__dict__, "padded_vocab": padded_vocab(cfg.true_vocab, cfg.vocab_divisor, layout.tp)})
    fam.validate(cfg, layout)
    base = ModelConfig(**{**cfg.__dict__, "padded_vocab": padded_vocab(cfg.true_vocab, cfg.vocab_divisor, 1)})
    dtype = opts["dtype"]
    inv = Inventory(FileCoord(0, 0), "global", {"model": [(k, s, None if s is None else dtype)
                                                          for k, s in fam.global_keys(base)]})
    src = plan_source(fam, base, Layout(ep=1), [inv])
    return fam, cfg, src, plan_target(fam, cfg, layout, src.manifest, src.arrays, set())


def generate(out: Path, layout: Layout, opts: dict, block: int = 256 << 20) -> dict:
    fam, cfg, src, files = plans(layout, opts)
    dtype = opts["dtype"]
    store = PoolStore()
    store.dtypes = {a: getattr(torch, s["dtype"]) for a, s in src.arrays.items()}
    args = make_args(cfg, layout, dtype, opts["seq"], True)
    common = {"args": args, "checkpoint_version": 3.0, "iteration": 10,
              "opt_param_scheduler": {"max_lr": 3e-4, "min_lr": 3e-5, "num_steps": 10, "warmup_steps": 2,
                                      "decay_style": "cosine"},
              "num_floating_point_operations_so_far": 1.0e12}
    out = Path(out)
    if out.exists():
        shutil.rmtree(out)
    it_dir = out / megatron.iter_dirname(10)
    total = 0
    for fp in files:
        sd = build_file(store, fp, common, {}, Progress(None, 0), block=block)
        sd["rng_state"] = [_rng_state(1234 + fp.coord.tp + 100 * fp.coord.pp)]
        (it_dir / fp.dirname).mkdir(parents=True)
        total += save_streaming(sd, it_dir / fp.dirname / legacy_files.MODEL_FILE)
    megatron.write_tracker(out, 10)
    return {"out": str(out), "layout": str(layout), "files": len(files), "bytes": total, "options": opts}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size-gb", type=float, default=2.0)
    ap.add_argument("--layout", default="tp2pp2")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--out", required=True)
    a = ap.parse_args(argv)
    t0 = time.monotonic()
    res = generate(Path(a.out), parse_layout(a.layout), shape_for(a.size_gb, a.dtype))
    res["seconds"] = round(time.monotonic() - t0, 2)
    print(json.dumps(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
