"""More workers than target rank files (issue 13): the workers share the files' records.

A legacy rank file is one torch zip whose tensor records hold raw bytes at offsets fixed once the zip's
skeleton is written (`ckptctl.reshard.stream.write_skeleton`: the pickle, the small records, every
tensor's record reserved, by torch's own writer, so the layout is exactly `save_streaming`'s). So:

1. each file's owner (the worker `assign` gives it, as before) writes the skeleton and its optimizer and
   RNG state, and publishes the records' (name, tensor, offset, length);
2. all records of all files are cut into parts of whole rows (large records into several) and the workers
   take the parts one at a time, largest first, as each is free (`Comm.take`: equal static shares finished
   1.3-3.8 s apart at 15 GB / 16 workers); each worker fills its parts with `pwrite` at their offsets, on
   its own file descriptor, and returns each part's CRC-32 and crc32c (`ckptctl.storage.zipwrite.RecordFill`);
3. the owner combines the parts' checksums in row order (`ckptctl.storage.crcs.combine`), patches each
   record's CRC-32 into the zip headers and marks the file done for `--resume`.

Every byte written is the one a single worker writes (the same skeleton, the same block bytes at the same
offsets), so the files are byte-identical whatever the number of workers (tests/test_parallel_write.py).
"""
from __future__ import annotations

import os
import time
from pathlib import Path

import ckptctl.reshard.resume as resume
from ckptctl.formats.legacy.files import MODEL_FILE
from ckptctl.reshard.plan import TensorItem
from ckptctl.reshard.stream import LazyTensor, finish_file, write_skeleton
from ckptctl.storage.build import lazy_tensor
from ckptctl.storage.crcs import CRC32, CRC32C, combine
from ckptctl.storage.trace import span
from ckptctl.storage.zipwrite import RecordFill

PARTS_PER_WORKER = 8        # parts per worker on average: taken as workers get free, a finer cut ends closer together
MIN_PART = 8 << 20          # bytes: smaller parts cost more in bookkeeping than they gain in balance


def write_shared(job, comm, progress, store, files: list, mine: list, block: int, prepare) -> None:
    """Write `files` with all workers. `prepare(i)` (owner only): the file's state dict (tensors as
    LazyTensors) and folder, its optimizer and RNG state already written."""
    t0 = time.time()
    layouts = {}
    for i in mine:
        if resume.target_done(job, i):
            progress.add(files[i].nbytes())
            continue
        sd, folder = prepare(i)
        names = {id(v): (chunk, key) for chunk in files[i].chunks if isinstance(sd.get(chunk), dict)
                 for key, v in sd[chunk].items() if isinstance(v, LazyTensor)}
        path = Path(folder) / MODEL_FILE
        archive, lazies = write_skeleton(sd, path)
        layouts[i] = (str(path), archive, [(name, names[id(lz)], off, lz.nbytes) for name, lz, off in lazies])
        del sd
    span(comm.rank, "target:skeletons", t0)
    merged = {}
    for g in comm.all_gather_object(layouts):
        merged.update(g)
    parts = _parts(files, merged, comm.world)
    t0 = time.time()
    done = []
    fds: dict[str, int] = {}
    items = {}
    try:
        order = sorted(range(len(parts)), key=lambda k: (-parts[k][-1], k))
        for j in comm.take("legacy-parts", len(order)):
            i, name, (chunk, key), off, r0, r1, _ = parts[order[j]]
            path = merged[i][0]
            if path not in fds:
                fds[path] = os.open(path, os.O_WRONLY)
            if i not in items:
                items[i] = {(it.chunk, it.key): it for it in files[i].items if isinstance(it, TensorItem)}
            item = items[i][(chunk, key)]
            lz = lazy_tensor(store, item, block, progress, rows=(r0, r1) if r1 is not None else None)
            row = _row_bytes(item, lz)
            fill = RecordFill(fds[path], off + (r0 or 0) * row)
            lz.fill(fill)
            expect = (r1 - r0) * row if r1 is not None else lz.nbytes
            if fill.n != expect:
                raise RuntimeError(f"{path}: {name} rows {r0}..{r1} got {fill.n} bytes, expected {expect}")
            done.append((i, name, r0 or 0, fill.n, fill.crc, fill.crc32c))
    finally:
        for fd in fds.values():
            os.close(fd)
    span(comm.rank, f"target:parts:{sum(d[3] for d in done)}", t0)   # each worker's parts and their bytes
    progress.add(0, force=True)
    results = [r for g in comm.all_gather_object(done) for r in g]
    for i in mine:
        if i not in merged:
            continue
        path, archive, recs = merged[i]
        got: dict[str, list] = {}
        for j, name, r0, n, crc, c32c in results:
            if j == i:
                got.setdefault(name, []).append((r0, n, crc, c32c))
        filled = []
        for name, _, off, nbytes in recs:
            crc = c32c = total = 0
            for _, n, pc, pc32c in sorted(got.get(name, [])):
                crc, c32c, total = combine(crc, pc, n, CRC32), combine(c32c, pc32c, n, CRC32C), total + n
            if total != nbytes:
                raise RuntimeError(f"{path}: {name} got {total} bytes from the workers, expected {nbytes}")
            filled.append((name, off, nbytes, crc, c32c))
        sums: dict = {}
        finish_file(Path(path), archive, filled, sums)
        resume.mark_target(job, i, Path(path).parent, sums)


def _row_bytes(item, lz: LazyTensor) -> int:
    return lz.nbytes // item.shape[0] if item.shape and item.shape[0] else 0


def _parts(files: list, layouts: dict, world: int) -> list[tuple]:
    """(file, record, (chunk, key), offset, r0, r1, bytes): records cut in row ranges, in file order."""
    total = sum(n for i in layouts for *_, n in layouts[i][2])
    target = max(MIN_PART, total // max(1, world * PARTS_PER_WORKER))
    items = {}
    out = []
    for i in sorted(layouts):
        items = {(it.chunk, it.key): it for it in files[i].items if isinstance(it, TensorItem)}
        for name, ck, off, nbytes in layouts[i][2]:
            shape = tuple(items[ck].shape)
            if not shape or not shape[0] or nbytes <= target:
                out.append((i, name, ck, off, None if not shape else 0, None if not shape else shape[0], nbytes))
                continue
            row = nbytes // shape[0]
            step = max(1, target // max(1, row))
            for r0 in range(0, shape[0], step):
                r1 = min(shape[0], r0 + step)
                out.append((i, name, ck, off, r0, r1, (r1 - r0) * row))
    return out
