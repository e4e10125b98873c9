"""Megatron -> Hugging Face: from the store's global arrays (so any source format and layout) to an HF
folder, written beside the destination and renamed into place when complete.

Every check runs before the first byte: the architecture (`arch.choose`), the name map covering every
store array, the true vocabulary. Shards are written by forked workers (each opens the store and
reads only the arrays, experts or vocab rows its tensors need), through the safetensors library, and
read back with it.
"""
from __future__ import annotations

from math import prod
from pathlib import Path

import torch

from ckptctl.box import Box
from ckptctl.errors import BadInput
from ckptctl.formats.hf import arch as archmod
from ckptctl.formats.hf import files
from ckptctl.formats.hf.names import Entry, check_covered, entries, hf_shape, view
from ckptctl.models.config import ModelConfig
from ckptctl.storage.commit import folder_beside

DEFAULT_SHARD = "5GB"      # transformers' save_pretrained default
DTYPES = ("float32", "bfloat16", "float16")


def store_args(store) -> dict:
    """The Megatron-LM args the store kept (the source's common state), as a dict."""
    from ckptctl.storage.objects import COMMON, get_object
    encs = store.attrs.get("objects", {})
    common = get_object(store, COMMON, encs.get(COMMON, "none")) or {}
    a = common.get("args")
    return dict(vars(a)) if a is not None else {}


class Plan:
    """Everything an export writes, decided from the store's attributes (no tensor read)."""

    def __init__(self, store_path: Path, true_vocab: int | None = None, dtype: str | None = None,
                 hf_arch: str | None = None, shard_size=DEFAULT_SHARD, token_ids: dict | None = None):
        from ckptctl.store import Store
        self.store_path = Path(store_path)
        store = Store.open(self.store_path)
        attrs = store.attrs
        if not attrs.get("complete"):
            raise BadInput(f"{store_path}: the store is incomplete (its source phase did not finish)")
        self.family = attrs["family"]
        self.cfg = ModelConfig.from_json(attrs["config"])
        self.args = store_args(store)
        self.arrays = attrs["arrays"]
        V = true_vocab or self.cfg.true_vocab or attrs.get("vocab", {}).get("true")
        if V is None:
            raise BadInput("the true vocabulary size is unknown (args.vocab_size is None): pass --true-vocab-size N")
        Vp = self.arrays["model/embedding.word_embeddings.weight"]["shape"][0]
        if V > Vp:
            raise BadInput(f"--true-vocab-size {V} is larger than the checkpoint's padded vocabulary {Vp}")
        self.vocab = int(V)
        self.arch = archmod.choose(self.family, self.cfg, self.args, hf_arch)
        self.entries = entries(self.arch, self.cfg, self.arrays, self.vocab)
        check_covered(self.entries, self.arrays, self.arch)
        src_dtypes = {self.arrays[e.array]["dtype"] for e in self.entries}
        if dtype is not None and dtype not in DTYPES:
            raise BadInput(f"--dtype: expected one of {', '.join(DTYPES)}, got {dtype!r}")
        if dtype is None and len(src_dtypes) > 1:
            raise BadInput(f"the checkpoint mixes dtypes {sorted(src_dtypes)}: pass --dtype")
        self.dtype = dtype or src_dtypes.pop()
        self.config = archmod.hf_config(self.arch, self.cfg, self.args, self.vocab, self.dtype, token_ids)
        item = getattr(torch, self.dtype).itemsize
        self.shapes = {e.hf: hf_shape(tuple(self.arrays[e.array]["shape"]), e.steps, self.cfg) for e in self.entries}
        sizes = [(e.hf, prod(self.shapes[e.hf]) * item) for e in self.entries]
        self.total = sum(b for _, b in sizes)
        self.shards = files.plan_shards(sizes, files.parse_size(shard_size))
        self.names = files.shard_names(len(self.shards))

    def describe(self) -> dict:
        return {"architecture": self.arch.cls, "model_type": self.arch.model_type, "tensors": len(self.entries),
                "shards": len(self.shards), "bytes": self.total, "dtype": self.dtype, "vocab": self.vocab}


def read_entry(store, e: Entry, cfg: ModelConfig, spec: dict, cache: dict) -> torch.Tensor:
    """One HF tensor's bytes from the store: an expert or the vocab rows are read as a box, the rest as
    the whole array (q/k/v and gate/up of one array share the read through `cache`)."""
    steps, shape = e.steps, tuple(spec["shape"])
    box, rest = Box.full(shape), steps
    if steps and steps[0][0] == "expert":
        box = Box((steps[0][1],) + (0,) * (len(shape) - 1), (1,) + shape[1:])
        rest = (("expert", 0),) + steps[1:]
    elif steps and steps[0][0] == "rows":
        box = Box((0,) * len(shape), (steps[0][1],) + shape[1:])
    key = (e.array, box)
    if key not in cache:
        cache.clear()
        cache[key] = store.read(e.array, box)
    return view(cache[key], rest, cfg).contiguous().reshape(hf_shape(shape, steps, cfg))


def write_shards(plan: Plan, folder: Path, which: list[int]) -> None:
    """Shards `which` of the plan into `folder`, a tensor at a time from the store."""
    from ckptctl.store import Store
    store = Store.open(plan.store_path)
    by_name = {e.hf: e for e in plan.entries}
    dtype = getattr(torch, plan.dtype)
    for i in which:
        cache: dict = {}

        def produce(name):
            e = by_name[name]
            t = read_entry(store, e, plan.cfg, plan.arrays[e.array], cache)
            return t if t.dtype == dtype else t.to(dtype)
        files.write_shard(folder / plan.names[i], [(n, plan.shapes[n], plan.dtype) for n in plan.shards[i]], produce)


def write_folder_files(plan: Plan, folder: Path) -> None:
    """The index (several shards), config.json and generation_config.json."""
    if len(plan.shards) > 1:
        files.write_index(folder, {k: plan.names[i] for i, s in enumerate(plan.shards) for k in s}, plan.total)
    files.write_json(folder / files.CONFIG, plan.config)
    files.write_json(folder / files.GENERATION, archmod.generation_config(plan.config))


def export(store_path: Path, out: Path, *, true_vocab: int | None = None, dtype: str | None = None,
           hf_arch: str | None = None, shard_size=DEFAULT_SHARD, overwrite: bool = False,
           token_ids: dict | None = None) -> dict:
    """The HF folder `out` from a complete store, in this process (convert's workers do the same in
    parallel: `ckptctl.formats.hf.target`); written beside `out` and renamed into place."""
    out = Path(out)
    plan = Plan(store_path, true_vocab, dtype, hf_arch, shard_size, token_ids)
    if (out.is_dir() and any(out.iterdir()) or out.is_file()) and not overwrite:
        raise BadInput(f"destination {out} exists and is not empty (use --overwrite)")
    with folder_beside(out, "ckptctl-hf") as tmp:
        tmp.mkdir(parents=True)
        write_shards(plan, tmp, list(range(len(plan.shards))))
        write_folder_files(plan, tmp)
    return {**plan.describe(), "out": str(out), "files": plan.names}
