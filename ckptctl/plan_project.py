"""`ckptctl plan`'s time projection: the per-worker throughput (measured here or given) and how long a
convert's two phases take on N nodes x W workers, with the files shared out as convert shares them.

Model (what a convert does per byte): the source phase reads each source file whole and writes the store
regions it owns; the target phase reads each target file's regions from the store and writes the file.
A worker moves its bytes at `rate` bytes/s (read + write counted separately); a phase lasts as long as its
busiest worker, and, with `node_rate`, at least a node's bytes over the node's rate (a shared filesystem
or NIC limit). Fixed: start-up and this plan's own planning time (every worker plans).
"""
from __future__ import annotations

import heapq
import os
import tempfile
import time
from pathlib import Path

STARTUP_S = 4.0     # fixed convert start-up measured in docs/performance.md (CLI, fork, store creation)


def assign(sizes: list[int], world: int) -> list[list[int]]:
    """`reshard.comm.assign` (largest first, to the least-loaded worker, ties to the lowest index) with a
    heap instead of a scan of every worker: the same assignment, in O(n log w) (tests check equality)."""
    heap = [(0, w) for w in range(world)]
    out: list[list[int]] = [[] for _ in range(world)]
    for i in sorted(range(len(sizes)), key=lambda i: (-sizes[i], i)):
        load, w = heapq.heappop(heap)
        out[w].append(i)
        heapq.heappush(heap, (load + sizes[i], w))
    return [sorted(x) for x in out]


def measure_rate(dirpath: str | None = None, nbytes: int = 256 << 20, repeats: int = 2,
                 block: int = 16 << 20) -> dict:
    """Bytes/s one process moves (write a file in blocks, fsync, read it back), best of `repeats`, in a
    temporary folder under `dirpath`; one block of memory. A page-cache-bound figure on most machines: pass
    --gbps from a real convert on the target filesystem (benchmarks/run.py) to project that filesystem."""
    import numpy as np
    buf = np.random.default_rng(0).integers(0, 255, block, dtype=np.uint8)
    back = bytearray(block)
    best = None
    with tempfile.TemporaryDirectory(dir=dirpath, prefix=".ckptctl-plan-") as d:
        p = Path(d) / "probe"
        for _ in range(repeats):
            t0 = time.perf_counter()
            with open(p, "wb") as f:
                for _ in range(nbytes // block):
                    f.write(buf)
                f.flush()
                os.fsync(f.fileno())
            got = 0
            with open(p, "rb", buffering=0) as f:
                while n := f.readinto(back):
                    got += n
            dt = time.perf_counter() - t0
            if got != nbytes // block * block:
                raise OSError(f"{p}: read back {got} of {nbytes} bytes")
            best = dt if best is None else min(best, dt)
            p.unlink()
    moved = 2 * (nbytes // block) * block
    return {"bytes_per_s": moved / best, "probe_bytes": moved // 2, "seconds": round(best, 3),
            "where": dirpath or tempfile.gettempdir(), "how": f"write + fsync + read of a probe file, best of {repeats}"}


def phase(costs: list[int], shares: list[int], workers: int, nodes: int, rate: float,
          node_rate: float | None) -> dict:
    """One phase: files shared by `shares` (what convert balances on), each costing `costs` bytes moved."""
    who = assign(shares, workers)
    loads = [sum(costs[i] for i in mine) for mine in who]
    per_node = len(who) // nodes
    node_loads = [sum(loads[n * per_node:(n + 1) * per_node]) for n in range(nodes)]
    worker_s = max(loads) / rate if loads else 0.0
    node_s = max(node_loads) / node_rate if node_rate and node_loads else 0.0
    return {"bytes_moved": sum(loads), "busiest_worker_bytes": max(loads, default=0),
            "busiest_node_bytes": max(node_loads, default=0), "seconds": round(max(worker_s, node_s), 2),
            "bound": "node" if node_s > worker_s else "worker",
            "idle_workers": sum(1 for x in loads if x == 0)}


def project(source_files: list[dict], target_files: list[dict], nodes: int, workers: int, rate: float,
            node_rate: float | None, plan_s: float, startup_s: float = STARTUP_S) -> dict:
    """`source_files`: per file {"read", "owned"} bytes; `target_files`: per file {"bytes"}."""
    total = nodes * workers
    src = phase([f["read"] + f["owned"] for f in source_files], [f["owned"] + 1 for f in source_files],
                total, nodes, rate, node_rate)
    tgt = phase([2 * f["bytes"] for f in target_files], [f["bytes"] + 1 for f in target_files],
                total, nodes, rate, node_rate)
    seconds = startup_s + plan_s + src["seconds"] + tgt["seconds"]
    return {"nodes": nodes, "workers_per_node": workers, "workers": total,
            "rate_per_worker_bytes_per_s": rate, "rate_per_node_bytes_per_s": node_rate,
            "startup_s": startup_s, "plan_s": round(plan_s, 2), "source_phase": src, "target_phase": tgt,
            "seconds": round(seconds, 1)}
