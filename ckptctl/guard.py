"""What keeps a run from harming others or leaving debris: one writer per destination (a lock file),
stale work folders of dead runs, signals turned into one clean stop, and refusal under torchrun/srun.
"""
from __future__ import annotations

import fcntl
from contextlib import contextmanager
import json
import os
import signal
import socket
import time
from pathlib import Path

from ckptctl.errors import BadInput, CkptctlError

SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


class Interrupted(CkptctlError):
    """A signal stopped the command. Exit code 128 + signal number, as shells report it."""

    def __init__(self, signum: int, dst: Path | None = None, committed: bool = False):
        self.signum, self.dst, self.committed = signum, dst, committed
        self.exit_code = 128 + signum
        super().__init__()

    def __str__(self) -> str:
        name = signal.Signals(self.signum).name
        if self.committed:
            return f"interrupted by {name} after {self.dst or 'the output'} was written completely"
        # no destination yet: the signal came before the command chose one (imports, inspection), when
        # nothing has been written anywhere
        return f"interrupted by {name}; nothing written" + (f" to {self.dst}" if self.dst else "")


_caught: list[int] = []
_raised: list[int] = []   # signals whose Interrupted is on its way up (not swallowed)


def _handler(signum, frame):
    # The first signal unwinds the command (workers stopped, work folder removed by the `finally`s on
    # the way); later ones are ignored so that this cleanup itself is not cut short.
    if _caught:
        return
    _caught.append(signum)
    if _deferring:
        return
    raise Interrupted(signum)


_deferring: list[bool] = []


@contextmanager
def deferred():
    """A signal during the block is held until it ends (the commit's renames), then raised as
    `Interrupted(committed=True)`: the output is complete."""
    _deferring.append(True)
    try:
        yield
    finally:
        _deferring.pop()
    if _caught and not _raised:
        _raised.append(_caught[0])
        raise Interrupted(_caught[0], committed=True)


def raise_pending() -> None:
    """Called from the launcher's polling loop: a signal whose exception was swallowed (it arrived in a
    callback where Python ignores exceptions, e.g. an at-fork hook) is raised again here, once."""
    if _caught and not _raised:
        _raised.append(_caught[0])
        raise Interrupted(_caught[0])


def install_signal_handlers() -> dict:
    """In the CLI's main thread: SIGINT, SIGTERM and SIGHUP raise `Interrupted`. Returns the handlers
    they replace (for `restore_signal_handlers`)."""
    _caught.clear()
    _raised.clear()
    prev = {}
    for s in SIGNALS:
        try:
            prev[s] = signal.signal(s, _handler)
        except (ValueError, OSError):   # not the main thread (tests calling the CLI in a thread)
            pass
    return prev


def restore_signal_handlers(prev: dict) -> None:
    for s, h in prev.items():
        try:
            signal.signal(s, h if h is not None else signal.SIG_DFL)
        except (ValueError, OSError, TypeError):
            pass


def reset_signals_in_worker() -> None:
    """A forked worker: default TERM/HUP (the parent stops workers with SIGKILL anyway); SIGINT ignored,
    because Ctrl-C reaches the whole process group and the parent does the stopping and the reporting."""
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGHUP, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def die_with_parent(parent_pid: int) -> None:
    """Linux parent-death signal: the kernel SIGKILLs this worker when the CLI dies (even by SIGKILL)."""
    try:
        import ctypes
        PR_SET_PDEATHSIG = 1
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    except (OSError, AttributeError):
        return
    if os.getppid() != parent_pid:   # the parent died before prctl took effect
        os._exit(1)


# --- torchrun / srun ------------------------------------------------------------------------------

def refuse_under_launcher(nnodes: int = 1) -> None:
    """ckptctl convert starts its own workers; started once per rank by torchrun or srun, the copies
    would all write the same destination. Refuse at once, saying how to run it. One process per node of
    a `--nnodes N` job (srun --ntasks-per-node=1, torchrun --nproc-per-node 1) is the intended use."""
    n = 1
    for var in ("WORLD_SIZE", "SLURM_STEP_NUM_TASKS"):   # torchrun; srun (a job step, not the batch script)
        try:
            n = max(n, int(os.environ.get(var) or 1))
        except ValueError:
            pass
    if nnodes > 1 and n == nnodes:
        return
    if n > 1 or ("RANK" in os.environ and os.environ.get("RANK") != "0"):
        raise BadInput(f"ckptctl convert was started as one of {n} processes (torchrun/srun: RANK/WORLD_SIZE set); "
                       "it starts its own workers: run it once per node, without torchrun/srun "
                       "(--nproc N for workers; --nnodes/--node-rank/--master-addr for several nodes)")


def clean_worker_env(env: dict) -> None:
    """Remove what a surrounding torchrun left in the environment: our workers form their own group
    (TORCHELASTIC_USE_AGENT_STORE=True would make them wait for a torchrun agent that is not theirs)."""
    for k in list(env):
        if k.startswith("TORCHELASTIC_") or k in ("GROUP_WORLD_SIZE", "ROLE_RANK", "ROLE_WORLD_SIZE", "ROLE_NAME",
                                                  "LOCAL_WORLD_SIZE", "GROUP_RANK", "TORCH_NCCL_ASYNC_ERROR_HANDLING"):
            env.pop(k, None)


# --- one writer per destination -------------------------------------------------------------------

def lock_path(dst: Path) -> Path:
    dst = Path(os.path.abspath(dst))
    return dst.parent / f".{dst.name}.ckptctl.lock"


def _holder(text: str) -> str:
    try:
        d = json.loads(text)
        return f"host {d['host']}, pid {d['pid']}, since {d['since']}"
    except (ValueError, KeyError, TypeError):
        return "unknown holder"


_held: set[int] = set()   # lock fds of this process


def close_inherited_locks() -> None:
    """In a forked worker: close the parent's lock fds. A flock belongs to the open file, which a fork
    shares; a worker outliving a killed CLI by milliseconds would otherwise still hold the lock."""
    for fd in list(_held):
        try:
            os.close(fd)
        except OSError:
            pass
    _held.clear()


class DestLock:
    """An exclusive flock on `.DST.ckptctl.lock` beside the destination, held for the whole run. The
    kernel drops it when the holder dies, so a lock file left by a dead run is simply taken over."""

    def __init__(self, dst: Path):
        self.path = lock_path(dst)
        self.fd: int | None = None
        self.note: str | None = None

    def acquire(self) -> "DestLock":
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                text = os.pread(fd, 4096, 0).decode(errors="replace")
                os.close(fd)
                raise BadInput(f"{self.path.parent / self.path.name[1:-len('.ckptctl.lock')]} is being written by "
                               f"another ckptctl ({_holder(text)}; lock {self.path}); wait for it or stop it") from None
            # the file we locked must still be the one at the path (a finishing holder unlinks it)
            try:
                same = os.stat(self.path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if not same:
                os.close(fd)
                continue
            old = os.pread(fd, 4096, 0).decode(errors="replace").strip()
            if old:
                self.note = f"took over the lock of a run that died ({_holder(old)})"
            me = json.dumps({"host": socket.gethostname(), "pid": os.getpid(),
                             "since": time.strftime("%Y-%m-%dT%H:%M:%S")})
            os.ftruncate(fd, 0)
            os.pwrite(fd, me.encode(), 0)
            self.fd = fd
            _held.add(fd)
            return self

    def release(self) -> None:
        if self.fd is None:
            return
        try:
            self.path.unlink(missing_ok=True)   # while still locked: a waiter re-checks the inode
        finally:
            _held.discard(self.fd)
            os.close(self.fd)
            self.fd = None

    def __enter__(self):
        return self.acquire()

    def __exit__(self, *exc):
        self.release()


# --- stale work folders ---------------------------------------------------------------------------

def stale_work(dst: Path, keep: Path | None = None) -> list[Path]:
    """Hidden work folders (and half-replaced old destinations) of earlier runs on `dst`. Called while
    holding the destination's lock: a live run on `dst` would hold it, so every one found is stale."""
    dst = Path(os.path.abspath(dst))
    if not dst.parent.is_dir():
        return []
    out = []
    for pat in (f".{dst.name}.ckptctl-*", f".{dst.name}.old-*"):
        out += [p for p in dst.parent.glob(pat) if p != keep and not p.name.endswith(".lock")]
    return sorted(out)


def remove_stale(dst: Path, keep: Path | None = None) -> list[str]:
    """Remove stale work folders of dead runs; one note each, with its size."""
    from ckptctl.output import human_bytes
    from ckptctl.paths import remove, tree_bytes
    notes = []
    dst = Path(os.path.abspath(dst))
    olds = sorted((p for p in stale_work(dst, keep) if ".old-" in p.name), key=lambda p: p.stat().st_mtime)
    if olds and not dst.exists() and not dst.is_symlink():
        # a run killed between its commit's two renames: the old destination is all there is; put it back
        olds[-1].rename(dst)
        notes.append(f"restored {dst.name} from {olds[-1].name}, left by a run killed while replacing it")
    for p in stale_work(dst, keep):
        n = tree_bytes(p)
        remove(p)
        what = ("a replaced destination's old copy" if ".old-" in p.name
                else "the work folder of an earlier run that did not finish")
        notes.append(f"removed {p.name}, {what} ({human_bytes(n)})")
    return notes
