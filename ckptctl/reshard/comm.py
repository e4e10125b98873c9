"""All communication between workers, in one place. A single process runs with no process group."""
from __future__ import annotations

import os
from datetime import timedelta

import torch.distributed as dist


class Comm:
    def __init__(self, timeout_s: float = 600.0):
        self.distributed = "RANK" in os.environ and int(os.environ.get("WORLD_SIZE", "1")) > 1
        if self.distributed and not dist.is_initialized():
            # gloo on CPU; the timeout turns a dead peer into an error instead of a hang.
            dist.init_process_group("gloo", timeout=timedelta(seconds=timeout_s))
        self.rank = dist.get_rank() if self.distributed else 0
        self.world = dist.get_world_size() if self.distributed else 1

    def barrier(self) -> None:
        """An all-reduce of one CPU number: torch's `dist.barrier` asks the machine for an accelerator each
        call (~50 ms on a GPU host, where CUDA is not even initialized in these workers)."""
        if self.distributed:
            import torch
            dist.all_reduce(torch.zeros(1))

    def all_gather_object(self, obj) -> list:
        if not self.distributed:
            return [obj]
        out = [None] * self.world
        dist.all_gather_object(out, obj)
        return out

    def take(self, name: str, n: int):
        """Indices 0..n-1, each handed to whichever worker asks for the next one first: workers that run
        faster take more (write-back and shared files make equal shares finish up to 3x apart). An
        atomic counter in the process group's key-value store (the one its rendezvous made), one round
        trip per index; every worker must iterate until the end, and `name` must be new in this run."""
        if not self.distributed:
            yield from range(n)
            return
        store = dist.distributed_c10d._get_default_store()
        while True:
            k = store.add(f"ckptctl/take/{name}", 1) - 1
            if k >= n:
                return
            yield k

    def all_reduce_sum(self, t) -> None:
        if self.distributed:
            dist.all_reduce(t)

    def close(self) -> None:
        if self.distributed and dist.is_initialized():
            dist.destroy_process_group()


def assign(sizes: list[int], world: int) -> list[list[int]]:
    """Deterministic greedy balance of items (by size, largest first) over workers."""
    loads = [0] * world
    out: list[list[int]] = [[] for _ in range(world)]
    for i in sorted(range(len(sizes)), key=lambda i: (-sizes[i], i)):
        w = min(range(world), key=lambda w: (loads[w], w))
        out[w].append(i)
        loads[w] += sizes[i]
    return [sorted(x) for x in out]
