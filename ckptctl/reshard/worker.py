"""Entry points of one worker: `forked` (started by ckptctl.reshard.launch on one node) and
`python -m ckptctl.reshard.worker JOB.json` (under torchrun, across nodes).

A failing worker writes its error where the launcher finds it and exits non-zero; the launcher
(or torchrun) then stops the others, so the user sees one clear message instead of a hang.
"""
from __future__ import annotations

import errno
import json
import os
import sys
import traceback
from pathlib import Path

from ckptctl.errors import BadInput
from ckptctl.reshard.run import Job, run_job


def main(argv: list[str], report_fd: int | None = None) -> int:
    """`report_fd`: a pipe to the launcher that carries this worker's error (the work folder may be on
    a full or broken filesystem, where an error file cannot be written)."""
    job = Job.load(Path(argv[1]))
    rank = int(os.environ.get("RANK", "0"))
    try:
        if os.environ.get("CKPTCTL_TEST_FAIL_RANK") == str(rank):   # fault injection for the tests
            raise RuntimeError(f"injected failure on rank {rank}")
        if os.environ.get("CKPTCTL_TEST_STALL_RANK") == str(rank):   # a worker still busy when a signal comes
            import time
            time.sleep(float(os.environ.get("CKPTCTL_TEST_STALL_S", "60")))
        if os.environ.get("CKPTCTL_TEST_KILL_RANK") == str(rank):   # a worker that dies without a word
            import signal
            os.kill(os.getpid(), signal.SIGKILL)
        result = _profiled(rank, run_job, job)
    except BaseException as e:  # noqa: BLE001 - every failure must reach the launcher
        err = Path(job.workdir) / "errors"
        kind = "bad_input" if isinstance(e, BadInput) else "internal"
        msg = str(e) or type(e).__name__
        if isinstance(e, OSError) and e.errno == errno.ENOSPC:   # the user's to fix, naming where
            kind, msg = "bad_input", f"No space left on device writing {e.filename or job.out or job.store}"
        doc = {"rank": rank, "kind": kind, "type": type(e).__name__, "message": msg[:4000],
               "traceback": traceback.format_exc()[-8000:]}
        if report_fd is not None:
            try:
                os.write(report_fd, json.dumps(doc).encode())
            except OSError:
                pass
        try:
            err.mkdir(parents=True, exist_ok=True)
            (err / f"rank{rank}.json").write_text(json.dumps(doc))
        except OSError:
            pass
        try:
            print(f"ckptctl worker {rank}: {type(e).__name__}: {msg}", file=sys.stderr)
        except OSError:
            pass
        return 1
    if rank == 0:
        (Path(job.workdir) / "result.json").write_text(json.dumps(result))
    return 0


def _profiled(rank: int, fn, *args):
    """`fn(*args)`, under cProfile when CKPTCTL_PROFILE names a folder (DIR/rank<N>.prof, for pstats or
    snakeviz): where a worker's seconds go (docs/performance.md)."""
    where = os.environ.get("CKPTCTL_PROFILE")
    if not where:
        return fn(*args)
    import cProfile
    prof = cProfile.Profile()
    try:
        return prof.runcall(fn, *args)
    finally:
        Path(where).mkdir(parents=True, exist_ok=True)
        prof.dump_stats(str(Path(where) / f"rank{rank}.prof"))


def forked(job_path: str, rank: int, world: int, port: int, log: str, parent: int | None = None,
           report_fd: int | None = None) -> None:
    """A worker forked from the CLI process: the environment torchrun would give it, output to the
    log, then `main`. Never returns (os._exit: no atexit handlers or buffers inherited from the parent).
    Dies with the CLI (parent-death signal), even when the CLI is SIGKILLed."""
    code = 1
    try:
        from ckptctl import guard
        guard.reset_signals_in_worker()
        guard.close_inherited_locks()
        if parent is not None:
            guard.die_with_parent(parent)
        guard.clean_worker_env(os.environ)
        try:
            fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        except OSError:   # a full filesystem: the error still travels through report_fd
            fd = os.open(os.devnull, os.O_WRONLY)
        os.dup2(fd, 1)
        os.dup2(fd, 2)
        os.close(fd)
        # Fresh stream objects: the parent's may have been locked by another thread at fork time.
        sys.stdout = open(1, "w", buffering=1, closefd=False)
        sys.stderr = open(2, "w", buffering=1, closefd=False)
        import faulthandler   # a SIGBUS/SIGSEGV leaves its Python traceback in the log (not the parent's terminal)
        faulthandler.enable(file=sys.stderr)
        _name(f"ckptctl-w{rank}")
        os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), LOCAL_WORLD_SIZE=str(world),
                          GROUP_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1")
        import torch
        torch.set_num_threads(1)
        code = main(["worker", job_path], report_fd)
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
