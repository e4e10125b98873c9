"""`Comm.take` (the legacy writer's parts, taken as workers get free): every index is handed out exactly
once over all workers, and a worker that asks faster takes more; alone, all indices in order."""
import multiprocessing
import os
import time

from ckptctl.reshard.comm import Comm
from ckptctl.reshard.launch import _free_port


def _worker(rank: int, world: int, port: int, n: int, delay: float, q) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    comm = Comm(timeout_s=60)
    got = []
    for k in comm.take("t", n):
        got.append(k)
        time.sleep(delay)
    comm.barrier()
    q.put((rank, got))
    comm.close()


def test_every_index_once_and_the_faster_worker_takes_more():
    ctx = multiprocessing.get_context("fork")
    q, port, n = ctx.Queue(), _free_port(), 40
    delays = [0.0, 0.05, 0.05]          # rank 0 is the fast one
    procs = [ctx.Process(target=_worker, args=(r, 3, port, n, d, q)) for r, d in enumerate(delays)]
    for p in procs:
        p.start()
    got = dict(q.get(timeout=120) for _ in procs)
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    taken = sorted(k for ks in got.values() for k in ks)
    assert taken == list(range(n))                       # each once, none lost
    assert all(ks == sorted(ks) for ks in got.values())  # in order within a worker
    assert len(got[0]) > len(got[1]) and len(got[0]) > len(got[2]), {r: len(k) for r, k in got.items()}


def test_alone_takes_everything_in_order(monkeypatch):
    monkeypatch.delenv("RANK", raising=False)
    assert list(Comm().take("t", 5)) == [0, 1, 2, 3, 4]
