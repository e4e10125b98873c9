"""A target rank file's state dict built from the store: tensors read region by region through the plan's
pieces (or as LazyTensors filled block by block while the file is written), objects from their slots."""
from __future__ import annotations

import numpy as np
import torch

from ckptctl.box import Box
from ckptctl.core.dtypes import torch_dtype
from ckptctl.reshard.stream import LazyTensor, row_blocks, sub_piece
from ckptctl.reshard.plan import FilePlan, ObjectItem, TensorItem
from ckptctl.storage.objects import empty_like_encoding, get_object
from ckptctl.storage.progress import Progress
from ckptctl.storage.zerocopy import gather, segments


def lazy_tensor(store, item: TensorItem, block: int, progress: Progress, rows: tuple | None = None) -> LazyTensor:
    """A target tensor produced block by block (rows of dim 0) from the store when its file is written;
    `rows` (r0, r1): only those rows (a part of the record, ckptctl.formats.legacy.parallel_write)."""
    dtype = torch_dtype(item.dtype)
    shape = tuple(item.shape)
    vol = int(np.prod(shape)) if shape else 1
    full = item.covered == vol

    def fill(write):
        if not shape:
            t = torch.zeros((), dtype=dtype)
            for p in item.pieces:
                t = store.read(p.array, p.gbox).reshape(())
            write(t)
            progress.add(t.element_size())
            return
        row = (vol // shape[0]) * dtype.itemsize if shape[0] else 0
        lo, hi = rows or (0, shape[0])
        for r0, r1 in ((lo + a, lo + b) for a, b in row_blocks(hi - lo, row, block)):
            lbox = Box((r0,) + (0,) * (len(shape) - 1), (r1 - r0,) + shape[1:])
            subs = list(_with_arrays(item, lbox))
            segs = _segments(store, subs, shape) if full else None
            if segs is not None:   # whole referenced chunks: written from the source mapping (storage.zerocopy)
                write(segs)
                progress.add(sum(s.nbytes for s in segs))
                continue
            if full and len(subs) == 1 and subs[0][0][0] == lbox:   # one piece: the read is the block
                (lb, gb), arr = subs[0]
                t = _read(store, arr, gb).reshape(lb.sizes)
            else:
                t = (torch.empty if full else torch.zeros)((r1 - r0,) + shape[1:], dtype=dtype)
                for (lb, gb), arr in subs:
                    t[lb.shift(tuple(-o for o in lbox.offsets)).slices] = _read(store, arr, gb).reshape(lb.sizes)
            write(t)
            progress.add(t.numel() * t.element_size())
            del t

    return LazyTensor(shape, dtype, fill)


def _read(store, arr: str, gb: Box):
    """A box of the store: from the source mappings when its chunks are references (storage.zerocopy)."""
    t = gather(store, arr, gb)
    return store.read(arr, gb) if t is None else t


def _segments(store, subs: list, shape: tuple) -> list | None:
    """The row block's bytes as source segments when its pieces are stacked along dim 0 (each spans the
    trailing dims) and each is a run of whole referenced chunks; else None."""
    out = []
    for (lb, gb), arr in sorted(subs, key=lambda s: s[0][0].offsets[0]):
        if tuple(lb.sizes[1:]) != tuple(shape[1:]):
            return None
        segs = segments(store, arr, gb)
        if segs is None:
            return None
        out += segs
    return out


def _with_arrays(item: TensorItem, lbox: Box):
    for p in item.pieces:
        s = sub_piece(p, lbox)
        if s is not None:
            yield s, p.array


def build_file(store, fp: FilePlan, common: dict, encs: dict, progress: Progress,
               block: int | None = None) -> dict:
    """The target file's state dict; with `block`, tensors are LazyTensors filled when the file is saved."""
    sd = dict(common)
    for chunk in fp.chunks:
        sd[chunk] = {}
    for item in fp.items:
        if isinstance(item, ObjectItem):
            enc = encs.get(item.slot)
            if enc is not None:
                sd[item.chunk][item.key] = get_object(store, item.slot, enc)
            else:  # the module's shard changed: its FP8 scaling state cannot follow
                sample = next((s for s in encs if s.startswith(item.gkey + "|")), None)
                sd[item.chunk][item.key] = empty_like_encoding(get_object(store, sample, encs[sample]) if sample else None)
            continue
        if block is not None:
            sd[item.chunk][item.key] = lazy_tensor(store, item, block, progress)
            continue
        dtype = torch_dtype(item.dtype)
        vol = int(np.prod(item.shape)) if item.shape else 1
        t = (torch.empty if item.covered == vol else torch.zeros)(item.shape, dtype=dtype)
        for p in item.pieces:
            t[p.local.slices] = store.read(p.array, p.gbox).reshape(p.local.sizes)
            progress.add(p.local.volume * t.element_size())
        sd[item.chunk][item.key] = t
    return sd
