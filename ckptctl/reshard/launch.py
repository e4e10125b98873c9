"""The parent side: start torchrun workers, show their progress, turn their failure into one error."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from ckptctl.errors import BadInput, WorkerFailure
from ckptctl.reshard.run import Job, run_job


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
    """Run `job` on `nproc` torchrun workers (0 = in this process) per node. Returns rank 0's result."""
    workdir = Path(job.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    if nproc <= 0:
        return run_job(job)
    nodes = nodes or Nodes()
    tag = f"-node{nodes.node_rank}" if nodes.multi else ""
    job_path = workdir / f"job{tag}.json"
    job.save(job_path)
    log = workdir / f"workers{tag}.log"
    if nodes.multi:   # static rendezvous at node 0's address, as `torchrun --nnodes N --node-rank R`
        where = [f"--nnodes={nodes.nnodes}", f"--node-rank={nodes.node_rank}",
                 f"--master-addr={nodes.master_addr}", f"--master-port={nodes.master_port}"]
    else:
        where = ["--nnodes=1", "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{_free_port()}"]
    cmd = [sys.executable, "-m", "torch.distributed.run", *where, f"--nproc-per-node={nproc}", "--max-restarts=0",
           "-m", "ckptctl.reshard.worker", str(job_path)]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    task = progress.add_task(label, total=max(total_bytes, 1)) if progress is not None else None
    start = time.monotonic()
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env)
        while proc.poll() is None:
            if task is not None:
                progress.update(task, completed=min(_done_bytes(workdir), total_bytes))
            if timeout_s and time.monotonic() - start > timeout_s:
                proc.kill()
                raise WorkerFailure(f"workers did not finish within {timeout_s:.0f} s (log: {log})")
            time.sleep(0.1)
    if task is not None:
        progress.update(task, completed=total_bytes if proc.returncode == 0 else _done_bytes(workdir))
    if proc.returncode != 0:
        raise _failure(workdir, log, proc.returncode)
    res = workdir / "result.json"
    return json.loads(res.read_text()) if res.exists() else {}


def _failure(workdir: Path, log: Path, rc: int) -> Exception:
    errors = []
    for f in sorted((workdir / "errors").glob("rank*.json")):
        try:
            errors.append(json.loads(f.read_text()))
        except (OSError, ValueError):
            pass
    if errors:
        # The root cause: a bad-input error beats the collective failures it caused on other ranks.
        first = sorted(errors, key=lambda e: (e["kind"] != "bad_input", "Connection" in e["message"], e["rank"]))[0]
        msg = f"worker {first['rank']}: {first['message']}"
        return BadInput(msg) if first["kind"] == "bad_input" else WorkerFailure(msg)
    tail = log.read_text(errors="replace").strip().splitlines()[-3:] if log.exists() else []
    return WorkerFailure(f"workers failed (exit {rc}): " + " | ".join(tail)[:400])
