"""How fast N processes write into their own files versus one shared file (pwrite, or a shared mmap).

    python benchmarks/pwrite_probe.py DIR [DIR ...]     # e.g. a disk folder and /dev/shm/x; DIR is emptied

Why: a target rank file is written by several workers at once (ckptctl.formats.legacy.parallel_write). On the
lent 16-core host (ext4, 2026-12-05) 16 processes wrote 26 GB/s into their own files and 4.2 GB/s into one
shared file; tmpfs 30 vs 3.0 GB/s: buffered writes to one inode are serialized, so a conversion with few,
large target files is bound by them (docs/performance.md).
"""
import mmap
import multiprocessing as mp
import os
import sys
import time

import numpy as np


def _write(path: str, off: int, n: int, blk: int, mode: str) -> None:
    buf = np.frombuffer(os.urandom(blk), np.uint8)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        if mode == "mmap":
            m = mmap.mmap(fd, n, mmap.MAP_SHARED, mmap.PROT_WRITE | mmap.PROT_READ, offset=off)
            a = np.frombuffer(m, np.uint8)
            for p in range(0, n, blk):
                a[p:p + blk] = buf
            del a
            m.close()
        else:
            done = 0
            while done < n:
                done += os.pwrite(fd, buf, off + done)
    finally:
        os.close(fd)


def timed(procs: list) -> float:
    """Seconds from starting the processes to the last one's end (also used by copy_probe.py)."""
    t = time.time()
    for p in procs:
        p.start()
    for p in procs:
        p.join()
    return time.time() - t


def run(d: str, nproc: int, mode: str, shared: bool, per: int = 512 << 20, blk: int = 4 << 20) -> tuple[float, float]:
    """GB/s and seconds for `nproc` processes writing `per` bytes each in `blk` pieces."""
    paths = [os.path.join(d, "shared" if shared else f"f{i}") for i in range(nproc)]
    for p in set(paths):   # mapped files need their size first
        if shared or mode == "mmap":
            with open(p, "wb") as f:
                f.truncate(per * nproc if shared else per)
    procs = [mp.Process(target=_write, args=(p, i * per if shared else 0, per, blk, mode)) for i, p in enumerate(paths)]
    dt = timed(procs)
    for f in os.listdir(d):
        os.unlink(os.path.join(d, f))
    return nproc * per / dt / 1e9, dt


if __name__ == "__main__":
    for d in sys.argv[1:]:
        os.makedirs(d, exist_ok=True)
        for n in (1, 4, 16):
            for mode in ("pwrite", "mmap"):
                for shared in (False, True):
                    gbps, dt = run(d, n, mode, shared)
                    kind = "one file " if shared else "own files"
                    print(f"{d} nproc={n:2d} {mode:6s} {kind}: {gbps:6.2f} GB/s ({dt:.2f} s)", flush=True)
