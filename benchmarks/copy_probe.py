"""How fast N workers can move the bytes of a few large source files into a few large target files, by method:
the target phase of a conversion with the checksums it computes, without the planning around it.

    python benchmarks/copy_probe.py DIR [--gb 15] [--files 4] [--nproc 16] [--modes a,b]   # DIR is emptied

Each worker takes every N-th 64 MiB part of the sources (in page cache, as right after the source phase) and
writes it at the same offset of the matching target file, computing the part's crc32c (the store reference
check) and CRC-32 (the zip record checksum). Methods:

- mmap_pwrite: the source mapped, each part checksummed on the mapping, then `pwrite` from the mapping
  (ckptctl's target phase up to 2026-12-05);
- fused: as mmap_pwrite, but both checksums and the `pwrite` per 2 MiB step (the step read from DRAM once);
- pread_pwrite: `preadv` into an 8 MiB buffer, both checksums on the (cache-hot) buffer, `pwrite` it;
- pread_mmap: the target part mapped shared (`MADV_POPULATE_WRITE` first), `preadv` straight into the
  mapping, checksums on it while it is hot: no user-space copy and no per-inode write lock;
- copy_range: `os.copy_file_range` per part (a kernel copy), no checksums (the floor of a kernel copy).

Why: ext4 serializes buffered writes to one inode (benchmarks/pwrite_probe.py), so few large target files
bound `pwrite`; page-fault writes through a shared mapping do not take that lock.
"""
from __future__ import annotations

import argparse
import mmap
import multiprocessing as mp
import os
import shutil
import subprocess
import time

import google_crc32c
import numpy as np
from pwrite_probe import timed

try:
    from isal.isal_zlib import crc32
except ImportError:  # pragma: no cover
    from zlib import crc32

PART = 64 << 20
BUF = 8 << 20
STEP = 2 << 20   # fused: each step checksummed twice and written while it is in cache
MADV_POPULATE_WRITE = getattr(mmap, "MADV_POPULATE_WRITE", 23)


def _ro(mv) -> np.ndarray:
    a = np.frombuffer(mv, np.uint8)
    a.flags.writeable = False   # google_crc32c.extend takes read-only buffers only
    return a


def _parts(sizes: list[int], rank: int, nproc: int):
    k = 0
    for f, size in enumerate(sizes):
        for off in range(0, size, PART):
            if k % nproc == rank:
                yield f, off, min(PART, size - off)
            k += 1


def _work(mode: str, srcs: list[str], dsts: list[str], sizes: list[int], rank: int, nproc: int, q) -> None:
    t0 = time.time()
    sfd = [os.open(p, os.O_RDONLY) for p in srcs]
    dfd = [os.open(p, os.O_RDWR) for p in dsts]
    smap = [mmap.mmap(fd, 0, access=mmap.ACCESS_READ) for fd in sfd] if mode in ("mmap_pwrite", "fused") else None
    buf = bytearray(BUF)
    crcs = 0
    for f, off, n in _parts(sizes, rank, nproc):
        if mode == "mmap_pwrite":
            view = np.frombuffer(smap[f], np.uint8, n, off)
            c = google_crc32c.value(view)
            smap[f].madvise(mmap.MADV_DONTNEED, off, n)
            z = crc32(view)
            done = 0
            while done < n:
                done += os.pwrite(dfd[f], view[done:], off + done)
            smap[f].madvise(mmap.MADV_DONTNEED, off, n)
        elif mode == "fused":
            view = np.frombuffer(smap[f], np.uint8, n, off)
            c = z = 0
            for p in range(0, n, STEP):
                v = view[p:p + STEP]
                c = google_crc32c.extend(c, v)
                z = crc32(v, z)
                done = 0
                while done < v.nbytes:
                    done += os.pwrite(dfd[f], v[done:], off + p + done)
            smap[f].madvise(mmap.MADV_DONTNEED, off, n)
        elif mode == "pread_pwrite":
            mv = memoryview(buf)
            c = z = 0
            for p in range(off, off + n, BUF):
                k = os.preadv(sfd[f], [mv[:min(BUF, off + n - p)]], p)
                c = google_crc32c.extend(c, _ro(mv[:k]))
                z = crc32(mv[:k], z)
                os.pwrite(dfd[f], mv[:k], p)
        elif mode == "pread_mmap":
            m = mmap.mmap(dfd[f], n, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE, offset=off)
            try:
                m.madvise(MADV_POPULATE_WRITE, 0, n)
            except OSError:
                pass
            mv = memoryview(m)
            c = z = 0
            for p in range(0, n, BUF):
                seg = mv[p:min(n, p + BUF)]
                k = os.preadv(sfd[f], [seg], off + p)
                c = google_crc32c.extend(c, _ro(seg[:k]))
                z = crc32(seg[:k], z)
                seg.release()
            mv.release()
            m.close()
        elif mode == "copy_range":
            done, c, z = 0, 0, 0
            while done < n:
                done += os.copy_file_range(sfd[f], dfd[f], n - done, off + done, off + done)
        crcs ^= c ^ z
    for fd in sfd + dfd:
        os.close(fd)
    q.put((rank, time.time() - t0, crcs))


def run(d: str, mode: str, srcs: list[str], sizes: list[int], nproc: int) -> float:
    dsts = [os.path.join(d, f"dst{i}") for i in range(len(srcs))]
    for p, s in zip(dsts, sizes):
        with open(p, "wb") as f:
            f.truncate(s)
    q = mp.Queue()
    procs = [mp.Process(target=_work, args=(mode, srcs, dsts, sizes, r, nproc, q)) for r in range(nproc)]
    dt = timed(procs)
    per = sorted(q.get()[1] for _ in procs)
    for p in dsts:
        os.unlink(p)
    subprocess.run(["sync"])
    print(f"{mode:13s} nproc={nproc:2d}: {sum(sizes) / dt / 1e9:6.2f} GB/s ({dt:.2f} s; worker max {per[-1]:.2f} "
          f"median {per[len(per) // 2]:.2f})", flush=True)
    return dt


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("dir")
    ap.add_argument("--gb", type=float, default=15)
    ap.add_argument("--files", type=int, default=4)
    ap.add_argument("--nproc", type=int, default=16)
    ap.add_argument("--modes", default="mmap_pwrite,fused,pread_pwrite,pread_mmap,copy_range")
    ap.add_argument("--repeat", type=int, default=2)
    a = ap.parse_args()
    shutil.rmtree(a.dir, ignore_errors=True)
    os.makedirs(a.dir)
    size = int(a.gb * 1e9 / a.files) // PART * PART
    block = np.random.default_rng(0).integers(0, 256, PART, np.uint8).tobytes()
    srcs = []
    for i in range(a.files):
        p = os.path.join(a.dir, f"src{i}")
        with open(p, "wb") as f:
            for _ in range(size // PART):
                f.write(block)
        srcs.append(p)
    subprocess.run(["sync"])
    t = time.time()
    os.makedirs(os.path.join(a.dir, "cp"))
    subprocess.run(["cp", *srcs, os.path.join(a.dir, "cp")])
    print(f"cp            : {size * a.files / (time.time() - t) / 1e9:6.2f} GB/s ({time.time() - t:.2f} s)", flush=True)
    shutil.rmtree(os.path.join(a.dir, "cp"))
    subprocess.run(["sync"])
    for _ in range(a.repeat):
        for mode in a.modes.split(","):
            run(a.dir, mode, srcs, [size] * a.files, a.nproc)
    shutil.rmtree(a.dir)


if __name__ == "__main__":
    main()
