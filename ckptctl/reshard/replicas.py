"""Replicated tensors (TP copies of norms and biases, the tied output layer, router weights) are
written to the store once, from their first holder; every other copy is compared with those bytes
while converting. A difference is an error naming the tensor and both rank files, unless
--allow-divergent-replicas (CKPTCTL_ALLOW_DIVERGENT_REPLICAS=1 in the workers), which keeps the
first holder's copy and says so.
"""
from __future__ import annotations

import os

from ckptctl.core.diff import same_bytes
from ckptctl.errors import BadInput

ALLOW_ENV = "CKPTCTL_ALLOW_DIVERGENT_REPLICAS"


def owners(plan) -> dict[tuple, str]:
    """(array, global box) -> the rank file whose copy the store holds."""
    out = {}
    for fp in plan.files:
        for t in fp.tensors:
            for p, owned in zip(t.pieces, t.owned):
                if owned:
                    out.setdefault((p.array, p.gbox), fp.dirname)
    return out


def check(store, plan, mine: list[int], open_unit, comm) -> list[str]:
    """After every source worker has written its pieces: compare this worker's replica pieces with the
    store's bytes; every worker learns of every difference (the store is then not marked complete).
    Returns the notes for the report (divergent copies allowed)."""
    who = owners(plan)
    found = []
    for i in mine:
        fp = plan.files[i]
        if not any(not o for t in fp.tensors for o in t.owned):
            continue
        sd = open_unit(fp)
        for t in fp.tensors:
            for p, owned in zip(t.pieces, t.owned):
                if owned:
                    continue
                local = sd.tensor(t)[p.local.slices].reshape(p.gbox.sizes)
                if not same_bytes(local, store.read(p.array, p.gbox).reshape(p.gbox.sizes)):
                    found.append(f"{t.key!r} differs between {who.get((p.array, p.gbox), '?')} and {fp.dirname}")
        del sd
    every = [f for part in comm.all_gather_object(found) for f in part]
    if not every:
        return []
    if os.environ.get(ALLOW_ENV) == "1":
        return [f"replica {f}: kept the copy of the first rank file (--allow-divergent-replicas)" for f in every]
    more = f" (and {len(every) - 1} more)" if len(every) > 1 else ""
    raise BadInput(f"replicated tensor {every[0]}{more}; the source is inconsistent "
                   "(pass --allow-divergent-replicas to keep the first rank file's copy)")
