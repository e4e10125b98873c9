"""`verify --nproc N`: the weight comparison spread over forked workers (issue 13).

The meaning is unchanged: each global tensor is still gathered from each checkpoint's own units (the
reference gather) and compared byte for byte, box by box within the memory budget (`--max-memory` is
per worker, as for convert). Workers take whole global tensors from a shared queue, largest first, so
each byte of either side is read by one worker; each opens the units it needs itself. The parent (rank 0)
collects one sub-report per tensor and merges them in the checkpoint's order, so the report, its
differences and their order are those of a one-process run. A worker that dies (killed, out of memory)
is an error naming it, exit 3; an error a worker raises (a truncated file: exit 2) is raised here.
"""
from __future__ import annotations

import multiprocessing
from concurrent.futures import FIRST_EXCEPTION, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool

from ckptctl.errors import WorkerFailure
from ckptctl.verify_gather import Gatherer, VerifyReport

_JOB: tuple | None = None        # (compare_one, sa, sb, limit): set by the parent, inherited by the forked workers
_GATHER: tuple | None = None     # this worker's gatherers (its own opened units)


def _start() -> None:
    import torch
    torch.set_num_threads(1)    # N workers on N cores: intra-op threads would only compete
    from ckptctl.reshard import stream
    stream.fixed_mmap_threshold()   # as every budgeted process: freed blocks go back to the system


def _one(name: str) -> VerifyReport:
    global _GATHER
    compare_one, sa, sb, limit = _JOB
    if _GATHER is None:
        _GATHER = (Gatherer(sa, release=True), Gatherer(sb, release=True))
    sub = VerifyReport("a", "b", str(sa.layout), str(sb.layout))   # only its counts and lists are merged
    compare_one(name, sa, sb, _GATHER[0], _GATHER[1], sub, limit)
    return sub


def merge(rep: VerifyReport, sub: VerifyReport) -> None:
    rep.tensors += sub.tensors
    rep.equal += sub.equal
    rep.bytes_compared += sub.bytes_compared
    rep.differences.extend(sub.differences)
    rep.allowed.extend(sub.allowed)
    rep.table.extend(sub.table)


def compare(names: list[str], sizes: dict[str, int], compare_one, sa, sb, limit: int, rep: VerifyReport,
            nproc: int, done=None) -> None:
    """Compare `names` (in this order in the report) with `nproc` forked workers; `done(nbytes)` after each."""
    global _JOB
    _JOB = (compare_one, sa, sb, limit)
    results: dict[str, VerifyReport] = {}
    ctx = multiprocessing.get_context("fork")
    pool = ProcessPoolExecutor(max_workers=nproc, mp_context=ctx, initializer=_start)
    try:
        futures = {pool.submit(_one, n): n for n in sorted(names, key=lambda n: -sizes.get(n, 0))}
        pending = set(futures)
        while pending:
            finished, pending = wait(pending, return_when=FIRST_EXCEPTION)
            for f in finished:
                results[futures[f]] = f.result()   # a worker's error is raised here; the rest are cancelled
                if done is not None:
                    done(results[futures[f]].bytes_compared)
    except BrokenProcessPool:
        raise WorkerFailure(f"a verify worker died (killed by a signal or out of memory?) after {len(results)} of "
                            f"{len(names)} tensors; try fewer workers (--nproc) or a smaller --max-memory") from None
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
        _JOB = None
    for n in names:
        merge(rep, results[n])

