"""The parent side: start the workers (forked here, or torchrun across nodes), show their progress,
turn their failure into one error."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from ckptctl import guard
from ckptctl.errors import BadInput, WorkerFailure
from ckptctl.reshard.run import Job, run_job
from ckptctl.storage.trace import span


@dataclass(frozen=True)
class Nodes:
    """A multi-node job: every node runs the same `ckptctl convert ... --nnodes N --node-rank R` with
    the checkpoint, the destination's parent (and so the store) on a filesystem all nodes share."""

    nnodes: int = 1
    node_rank: int = 0
    master_addr: str | None = None
    master_port: int | None = None

    @property
    def multi(self) -> bool:
        return self.nnodes > 1

    def check(self) -> None:
        if self.nnodes < 1 or not 0 <= self.node_rank < self.nnodes:
            raise BadInput(f"--node-rank {self.node_rank} is not in 0..{self.nnodes - 1}")
        if self.multi and (not self.master_addr or not self.master_port):
            raise BadInput("a multi-node convert needs --master-addr and --master-port (node 0's address)")


def default_nproc() -> int:
    """Workers default to the cores we have, at most 8 (process start dominates tiny jobs)."""
    return max(1, min(8, os.cpu_count() or 1))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _done_bytes(workdir: Path) -> int:
    total = 0
    for f in (workdir / "progress").glob("rank*"):
        if f.suffix == ".tmp":
            continue
        try:
            total += int(f.read_text() or 0)
        except (OSError, ValueError):
            pass
    return total


def run(job: Job, nproc: int, total_bytes: int, progress=None, label: str = "converting",
        timeout_s: float | None = None, nodes: Nodes | None = None) -> dict:
    """Run `job` on `nproc` workers (0 = in this process) per node. Returns rank 0's result.

    One node: the workers are forked from this process, which has already imported torch and the
    worker code while inspecting the source, so they start in milliseconds (no second interpreter,
    no torchrun agent) and rendezvous over gloo on a loopback port. Several nodes (or
    CKPTCTL_LAUNCHER=torchrun): torchrun with static rendezvous at node 0.
    """
    workdir = Path(job.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    nodes = nodes or Nodes()
    tag = f"-node{nodes.node_rank}" if nodes.multi else ""
    job_path = workdir / f"job{tag}.json"
    if job_path.is_file() and job_path.read_text() != json.dumps(job.__dict__):
        # a reused (--resume) work folder of a different job: nothing in it is this job's
        import shutil
        from ckptctl.paths import remove
        for p in workdir.iterdir():
            remove(p)
    job.save(job_path)
    if nproc <= 0:
        return run_job(job)
    log = workdir / f"workers{tag}.log"
    task = progress.add_task(label, total=max(total_bytes, 1)) if progress is not None else None
    start, start_wall = time.monotonic(), time.time()
    before = source_stats(job)
    procs = (_torchrun(job_path, nproc, nodes, log) if nodes.multi or not _can_fork() else
             _fork(job_path, nproc, log))
    rc, who, bus = 0, None, None
    try:
        while True:
            codes = [p.poll() for p in procs]
            failed = [(c, p.rank) for c, p in zip(codes, procs) if c not in (None, 0)]
            if failed or all(c == 0 for c in codes):
                rc, who = failed[0] if failed else (0, None)
                bus = next((r for c, r in failed if c == -signal.SIGBUS), None)   # peers fail after it: look first
                break
            guard.raise_pending()
            if task is not None:
                progress.update(task, completed=min(_done_bytes(workdir), total_bytes))
            if timeout_s and time.monotonic() - start > timeout_s:
                raise WorkerFailure(f"workers did not finish within {timeout_s:.0f} s (log: {log})")
            _wait(procs, 0.05)
    finally:   # one failed worker stops the rest (its peers would wait on it until the gloo timeout)
        for p in procs:
            p.stop()
        span("cli", "workers", start_wall)
    if task is not None:
        progress.update(task, completed=total_bytes if rc == 0 else _done_bytes(workdir))
    if rc != 0:
        changed = changed_source(job, before) if bus is not None else None
        if changed is not None:   # SIGBUS on a mapping of a source file that shrank: the input's fault, named
            raise BadInput(f"{changed} (worker {bus} died of SIGBUS reading it); nothing was written")
        raise _failure(workdir, log, rc, who, [d for p in procs for d in p.reports()])
    res = workdir / "result.json"
    return json.loads(res.read_text()) if res.exists() else {}


def _can_fork() -> bool:
    """Fork unless asked not to, not possible, or this process is itself in a process group (a
    forked child would inherit that group's state instead of joining its own)."""
    import multiprocessing
    import torch.distributed as dist
    return os.environ.get("CKPTCTL_LAUNCHER", "fork") != "torchrun" and \
        "fork" in multiprocessing.get_all_start_methods() and not (dist.is_available() and dist.is_initialized())


def _wait(procs: list, timeout: float) -> None:
    """Sleep until a forked worker exits or `timeout` passes (a tiny job ends as its last worker does, not
    at the next tick); torchrun's agent has no sentinel: a plain sleep."""
    sentinels = [p.h.sentinel for p in procs if not isinstance(p.h, subprocess.Popen) and p.h.exitcode is None]
    if sentinels:
        from multiprocessing.connection import wait
        wait(sentinels, timeout)
    else:
        time.sleep(timeout)


class _Proc:
    """A started worker (or the torchrun agent): poll() -> exit code or None; stop() ends it."""

    def __init__(self, handle, rank: int | None = None, report_fd: int | None = None):
        self.h, self.rank, self.fd = handle, rank, report_fd

    def reports(self) -> list[dict]:
        """The error the worker sent through its pipe (read once it has exited), if any."""
        if self.fd is None:
            return []
        data = b""
        try:
            while chunk := os.read(self.fd, 65536):
                data += chunk
        except BlockingIOError:
            pass
        finally:
            os.close(self.fd)
            self.fd = None
        try:
            return [json.loads(data)] if data else []
        except ValueError:
            return []

    def poll(self):
        if isinstance(self.h, subprocess.Popen):
            return self.h.poll()
        return None if self.h.is_alive() else self.h.exitcode

    def stop(self) -> None:
        if self.poll() is not None:
            if not isinstance(self.h, subprocess.Popen):
                self.h.join()
            return
        self.h.kill()
        if isinstance(self.h, subprocess.Popen):
            self.h.wait()
        else:
            self.h.join()


def _fork(job_path: Path, nproc: int, log: Path) -> list[_Proc]:
    import multiprocessing
    from ckptctl.reshard import worker
    ctx, port = multiprocessing.get_context("fork"), _free_port()
    procs = []
    for rank in range(nproc):
        r, w = os.pipe()   # the worker's error report, independent of the work folder's filesystem
        os.set_blocking(r, False)
        p = ctx.Process(target=worker.forked, args=(str(job_path), rank, nproc, port, str(log), os.getpid(), w),
                        name=f"ckptctl-worker-{rank}", daemon=True)
        try:
            p.start()
        finally:
            os.close(w)
        procs.append(_Proc(p, rank, r))
    return procs


def _torchrun(job_path: Path, nproc: int, nodes: Nodes, log: Path) -> list[_Proc]:
    if nodes.multi:   # static rendezvous at node 0's address, as `torchrun --nnodes N --node-rank R`
        where = [f"--nnodes={nodes.nnodes}", f"--node-rank={nodes.node_rank}",
                 f"--master-addr={nodes.master_addr}", f"--master-port={nodes.master_port}"]
    else:
        where = ["--nnodes=1", "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{_free_port()}"]
    cmd = [sys.executable, "-m", "torch.distributed.run", *where, f"--nproc-per-node={nproc}", "--max-restarts=0",
           "-m", "ckptctl.reshard.worker", str(job_path)]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    with open(log, "wb") as out:
        return [_Proc(subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env))]


def source_stats(job: Job) -> dict[str, tuple[int, int]]:
    """(size, mtime_ns) of every source file the workers read, taken before they start: a worker that dies
    of SIGBUS read a mapped file (rank files are loaded with mmap, referenced chunks are mapped) that
    shrank under it, and `changed_source` names it."""
    dirs = {str(Path(i["path"]).parent) for i in job.inventories if i.get("path")}   # rank dirs (+ distrib_optim.pt)
    if job.dist and job.dist.get("iter_dir"):
        dirs.add(str(job.dist["iter_dir"]))
    out = {}
    for d in sorted(dirs):
        try:
            with os.scandir(d) as it:
                for e in it:
                    if e.is_file():
                        st = e.stat()
                        out[e.path] = (st.st_size, st.st_mtime_ns)
        except OSError:
            continue
    return out


def changed_source(job: Job, before: dict[str, tuple[int, int]]) -> str | None:
    """The first source file removed, truncated or rewritten since `before`, or referenced by the store
    beyond its end (a target-only job); None when every file is as it was (the SIGBUS has another cause)."""
    for path, (size, mtime) in sorted(before.items()):
        try:
            st = os.stat(path)
        except OSError:
            return f"{path}: the source file was removed during the conversion"
        if st.st_size < size:
            return f"{path}: the source file was truncated during the conversion, {size} -> {st.st_size} bytes"
        if (st.st_size, st.st_mtime_ns) != (size, mtime):
            return f"{path}: the source file changed during the conversion"
    try:
        from ckptctl.storage.refs import Refs
        ends: dict[str, int] = {}
        for path, off, n, _ in Refs.load(Path(job.store)).entries.values():
            ends[path] = max(ends.get(path, 0), off + n)
    except (OSError, ValueError, TypeError):
        return None
    for path, end in sorted(ends.items()):
        try:
            size = os.stat(path).st_size
        except OSError:
            return f"{path}: the source file was removed during the conversion"
        if size < end:
            return f"{path}: the source file was truncated during the conversion to {size} bytes, the store " \
                   f"references bytes up to {end}"
    return None


def _failure(workdir: Path, log: Path, rc: int, rank: int | None = None, reports: list | None = None) -> Exception:
    if rank is not None and rc < 0:   # a forked worker killed by a signal (e.g. SIGKILL from the OOM killer)
        return WorkerFailure(f"worker {rank} died: {_signame(-rc)} (out of memory? "
                             "try a smaller --max-memory or fewer workers)")
    errors = list(reports or [])
    seen = {e.get("rank") for e in errors}
    try:
        files = sorted((workdir / "errors").glob("rank*.json"))
    except OSError:
        files = []
    for f in files:
        try:
            e = json.loads(f.read_text())
        except (OSError, ValueError):
            continue
        if e.get("rank") not in seen:
            errors.append(e)
    if errors:
        # The root cause: a bad-input error beats the collective failures it caused on other ranks.
        first = sorted(errors, key=lambda e: (e["kind"] != "bad_input", "Connection" in e["message"], e["rank"]))[0]
        msg = f"worker {first['rank']}: {first['message']}"
        return BadInput(msg) if first["kind"] == "bad_input" else WorkerFailure(msg)
    try:
        tail = log.read_text(errors="replace").strip().splitlines()[-3:] if log.exists() else []
    except OSError:
        tail = []
    return WorkerFailure(f"workers failed (exit {rc}): " + " | ".join(tail)[:400])


def _signame(n: int) -> str:
    try:
        return signal.Signals(n).name
    except ValueError:
        return f"signal {n}"
