"""The one output sink: results to stdout (rich tables or JSON), errors and progress to stderr.

On a terminal: rich colours and a live bar. Piped into a log (a Slurm job): no colours, no wrapping at
80 columns, and one plain line per phase instead of a redrawn bar. Sizes are binary units everywhere
(KiB, MiB, GiB: powers of 1024), as `du -h` and `--max-memory` count them.
"""
from __future__ import annotations

import json
import os
import sys
import time
from contextlib import contextmanager

from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

_START = time.monotonic()
QUIET = False        # --quiet: no progress, no text results (errors and --json still printed)
JSON_MODE = False    # --json on the command line: errors as JSON on stdout too


def _console(stderr: bool) -> Console:
    stream = sys.stderr if stderr else sys.stdout
    tty = stream.isatty()
    # Not a terminal: wide enough that no line is wrapped mid-phrase in a log file.
    return Console(stderr=stderr, width=None if tty else 10_000, soft_wrap=not tty)


out = _console(False)
err = _console(True)


def wall_seconds() -> float:
    """Seconds since this process started (interpreter and imports included), as `time` would say."""
    try:
        with open("/proc/self/stat") as f:
            start_ticks = int(f.read().rsplit(")", 1)[1].split()[19])
        with open("/proc/uptime") as f:
            up = float(f.read().split()[0])
        age = up - start_ticks / os.sysconf("SC_CLK_TCK")
        if age >= 0:
            return age
    except (OSError, ValueError, IndexError):
        pass
    return time.monotonic() - _START


def emit_json(obj) -> None:
    sys.stdout.write(json.dumps(obj, indent=2, default=str) + "\n")
    sys.stdout.flush()


def say(line: str) -> None:
    """A plain result line on stdout (nothing with --quiet)."""
    if not QUIET:
        out.print(line, highlight=False, markup=False)


def error(msg: str, hint: str | None = None, exit_code: int | None = None) -> None:
    """One error line on stderr; with --json also `{"ok": false, "error", "exit_code"}` on stdout."""
    if JSON_MODE and exit_code is not None:
        emit_json({"ok": False, "error": msg, "exit_code": exit_code})
    err.print(f"[bold red]error:[/] {msg}", highlight=False, soft_wrap=True)
    if hint:
        err.print(f"[dim]{hint}[/]", highlight=False)


class _LineProgress:
    """The Progress API convert's launcher uses, printed as one line per task when it ends (logs)."""

    def __init__(self, console: Console):
        self.console, self.tasks = console, {}

    def add_task(self, description: str, total: float = 0, **_):
        tid = len(self.tasks)
        self.tasks[tid] = {"d": description, "total": total, "done": 0, "t0": time.monotonic(), "ended": False}
        self.console.print(f"{description}: started, {human_bytes(int(total))} to move", highlight=False,
                           markup=False)
        return tid

    def update(self, tid, completed=None, total=None, **_):
        t = self.tasks[tid]
        if total is not None:
            t["total"] = total
        if completed is not None:
            t["done"] = completed
        if t["total"] and t["done"] >= t["total"]:
            self._end(t)

    def _end(self, t) -> None:
        if not t["ended"]:
            t["ended"] = True
            s = time.monotonic() - t["t0"]
            self.console.print(f"{t['d']}: {human_bytes(int(t['done']))} in {s:.2f} s", highlight=False, markup=False)

    def finish(self) -> None:
        for t in self.tasks.values():
            self._end(t)


class _Bar(Progress):
    """A rich bar whose total grows when the work done passes the estimate (never 725/290 MiB)."""

    def update(self, task_id, *, completed=None, total=None, **kw):
        if completed is not None:
            cur = self._tasks[task_id].total or 0
            if completed > cur:
                total = max(total or 0, completed)
        super().update(task_id, completed=completed, total=total, **kw)


class _BytesColumn(TextColumn):
    def __init__(self):
        super().__init__("")

    def render(self, task):
        from rich.text import Text
        return Text(f"{human_bytes(int(task.completed))}/{human_bytes(int(task.total or 0))}")


class _SpeedColumn(TextColumn):
    def __init__(self):
        super().__init__("")

    def render(self, task):
        from rich.text import Text
        sp = task.finished_speed or task.speed
        return Text(f"{human_bytes(int(sp))}/s" if sp else "")


@contextmanager
def progress(enabled: bool):
    if not enabled or QUIET:
        yield None
        return
    if not err.is_terminal:
        p = _LineProgress(err)
        try:
            yield p
        finally:
            p.finish()
        return
    with _Bar(TextColumn("{task.description}"), BarColumn(), _BytesColumn(), _SpeedColumn(),
              TimeElapsedColumn(), console=err, transient=False) as p:
        yield p


def table(title: str, columns: list[str], rows: list[list], styles: dict | None = None) -> None:
    if QUIET:
        return
    t = Table(title=title, show_lines=False)
    for c in columns:
        t.add_column(c, justify="right" if c in ("seconds", "bytes", "speed", "elements", "count") else "left")
    for r in rows:
        t.add_row(*[str(x) for x in r])
    out.print(t)


def human_bytes(n: int | float) -> str:
    """Binary units (KiB = 1024 B) everywhere ckptctl prints a size."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return str(n)


def rate(nbytes: int, seconds: float) -> str:
    """A speed in the same binary units."""
    return f"{human_bytes(nbytes / seconds)}/s" if seconds > 0 else "-"
