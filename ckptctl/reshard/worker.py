"""Entry points of one worker: `forked` (started by ckptctl.reshard.launch on one node) and
`python -m ckptctl.reshard.worker JOB.json` (under torchrun, across nodes).

A failing worker writes its error where the launcher finds it and exits non-zero; the launcher
(or torchrun) then stops the others, so the user sees one clear message instead of a hang.
"""
from __future__ import annotations

import json
import os
import sys
import traceback
from pathlib import Path

from ckptctl.errors import BadInput
from ckptctl.reshard.run import Job, run_job


def main(argv: list[str]) -> int:
    job = Job.load(Path(argv[1]))
    rank = int(os.environ.get("RANK", "0"))
    try:
        if os.environ.get("CKPTCTL_TEST_FAIL_RANK") == str(rank):   # fault injection for the tests
            raise RuntimeError(f"injected failure on rank {rank}")
        if os.environ.get("CKPTCTL_TEST_KILL_RANK") == str(rank):   # a worker that dies without a word
            import signal
            os.kill(os.getpid(), signal.SIGKILL)
        result = run_job(job)
    except BaseException as e:  # noqa: BLE001 - every failure must reach the launcher
        err = Path(job.workdir) / "errors"
        err.mkdir(parents=True, exist_ok=True)
        kind = "bad_input" if isinstance(e, BadInput) else "internal"
        msg = str(e) or type(e).__name__
        (err / f"rank{rank}.json").write_text(json.dumps(
            {"rank": rank, "kind": kind, "type": type(e).__name__, "message": msg, "traceback": traceback.format_exc()}))
        print(f"ckptctl worker {rank}: {type(e).__name__}: {msg}", file=sys.stderr)
        return 1
    if rank == 0:
        (Path(job.workdir) / "result.json").write_text(json.dumps(result))
    return 0


def forked(job_path: str, rank: int, world: int, port: int, log: str) -> None:
    """A worker forked from the CLI process: the environment torchrun would give it, output to the
    log, then `main`. Never returns (os._exit: no atexit handlers or buffers inherited from the parent)."""
    code = 1
    try:
        fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        os.dup2(fd, 1)
        os.dup2(fd, 2)
        os.close(fd)
        # Fresh stream objects: the parent's may have been locked by another thread at fork time.
        sys.stdout = open(1, "w", buffering=1, closefd=False)
        sys.stderr = open(2, "w", buffering=1, closefd=False)
        _name(f"ckptctl-w{rank}")
        os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), LOCAL_WORLD_SIZE=str(world),
                          GROUP_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1")
        import torch
        torch.set_num_threads(1)
        code = main(["worker", job_path])
    except BaseException:  # noqa: BLE001 - a failure before main() still ends this process
        traceback.print_exc()
    finally:
        try:
            sys.stdout.flush()
            sys.stderr.flush()
        finally:
            os._exit(code)


def _name(name: str) -> None:
    """The process name that ps and top show (prctl PR_SET_NAME), so the workers can be told apart."""
    try:
        import ctypes
        ctypes.CDLL(None).prctl(15, name.encode()[:15], 0, 0, 0)
    except (OSError, AttributeError):
        pass


if __name__ == "__main__":
    sys.exit(main(sys.argv))
