"""Where an element of a torch_dist checkpoint's optimizer state lies (verify's locations,
`Format.optim_locate`): the sharded key, the `.distcp` file of the `.metadata` chunk holding it, that
chunk's global offsets and the element inside the chunk's saved tensor.

* model space (non-distributed Adam, `fully_reshardable`): the per-parameter key
  (`optimizer.state.<name>.<model key>`) whose chunk the reader (`optim_read.ModelSpace`) maps onto the
  element, as verify's weight locations map model chunks.
* `dp_reshardable`: the bucket key; the element's offset in the flat buffer (`Held.buffer`, from
  `Context.layout_of`) split into buckets by `optim_read.bucket_layouts`, as the reader concatenates them.
"""
from __future__ import annotations

import json

from ckptctl.box import Box
from ckptctl.core.dtypes import itemsize
from ckptctl.formats.torch_dist.optim_info import bucket_key, chained, group_index
from ckptctl.formats.torch_dist.optim_read import bucket_layouts
from ckptctl.optstate.params import optim_array


def locate(src, gather, array: str, comp: str, index: list[int], held, memo: dict) -> dict | None:
    dec = gather.dec
    if dec.model is not None:
        return _model_space(dec, optim_array(array, comp), index)
    if held.buffer is None:
        return None
    return _bucket_space(dec, gather, comp, held)


def _model_space(dec, name: str, index: list[int]) -> dict | None:
    one = Box(tuple(index), (1,) * len(index))
    for item, p in dec.model.pieces.get(name, ()):
        hit = p.gbox.intersect(one)
        if hit is None:
            continue
        local = list(hit.shift(tuple(lo - g for lo, g in zip(p.local.offsets, p.gbox.offsets))).offsets)
        off, lay = json.loads(item.key)     # the chunk's offsets; the layer within a stacked chunk
        meta = dec.dist["index"]["tensors"][item.chunk]
        chunk = next(c for c in meta["chunks"] if list(c[0]) == list(off))
        return _at(dec, item.chunk, chunk, ([lay] if lay is not None else []) + local, itemsize(meta["dtype"]))
    return None


def _bucket_space(dec, gather, comp: str, held) -> dict | None:
    ctx, fp = gather.ctx, gather.files[held.fi]
    s, g, buf, off = held.buffer
    params = ctx.params(fp)
    _, bufs = ctx.layout_of(fp, params)
    lays = bucket_layouts(ctx, fp, bufs[s], fp.coord.pp, s, sum(p.numel for p in params))
    at = off + held.flat
    for b, bucket in enumerate(lays[g][1]):     # saved buckets hold numel_unpadded each, concatenated
        if at < bucket[2]:
            break
        at -= bucket[2]
    else:
        return None
    key = bucket_key(group_index(ctx.layout, fp.coord, s), g, buf.dtypes, b, comp, chained(s, len(bufs)))
    meta = dec.dist["index"]["tensors"].get(key)
    if meta is None:
        return None
    chunk = next((c for c in meta["chunks"] if c[0][0] <= at < c[0][0] + c[1][0]), None)
    if chunk is None:
        return None
    where = _at(dec, key, chunk, [at - chunk[0][0]], itemsize(meta["dtype"]))
    where.update(bucket_offset=at, buffer_offset=off + held.flat, param=held.param.key)
    return where


def _at(dec, key: str, chunk, local: list[int], size: int) -> dict:
    off, sizes, fname, boff, _ = chunk
    flat = 0
    for i, n in zip(local, sizes):
        flat = flat * n + i
    return {"file": str(dec.iter_dir / fname), "tensor": key, "chunk_offsets": list(off), "blob_offset": boff,
            "local_index": local, "byte_offset": flat * size}
