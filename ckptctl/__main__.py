"""`python -m ckptctl` and the `ckptctl` command (pyproject's script): `ckptctl.cli.main`, then a quick exit."""
import os
import sys

from ckptctl.cli import main


def entry() -> None:
    """The `ckptctl` command: `main`, then a quick exit. After a command that imported torch, the interpreter's
    own finalization (tearing down torch, zarr and their modules) takes 0.4-1 s more than the work of a small
    conversion; once the exit handlers have run and the output is flushed, nothing is left to do, so the
    process ends there (os._exit). With threads still running (a library's, not ours) the normal exit runs."""
    try:
        main()
        code = 0
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        if e.code is not None and not isinstance(e.code, int):
            print(e.code, file=sys.stderr)
    import threading
    if "torch" not in sys.modules or threading.active_count() > 1:
        sys.exit(code)
    import atexit
    atexit._run_exitfuncs()
    try:
        sys.stdout.flush()
        sys.stderr.flush()
    except (OSError, ValueError):   # a closed or broken pipe: let the normal exit report it
        sys.exit(code)
    os._exit(code)


if __name__ == "__main__":
    entry()
