"""The one output sink: results to stdout (rich tables or JSON), errors and progress to stderr."""
from __future__ import annotations

import json
import sys
from contextlib import contextmanager

from rich.console import Console
from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeElapsedColumn, TransferSpeedColumn
from rich.table import Table

out = Console()
err = Console(stderr=True)


def emit_json(obj) -> None:
    sys.stdout.write(json.dumps(obj, indent=2, default=str) + "\n")


def error(msg: str, hint: str | None = None) -> None:
    err.print(f"[bold red]error:[/] {msg}", highlight=False, soft_wrap=True)
    if hint:
        err.print(f"[dim]{hint}[/]", highlight=False)


@contextmanager
def progress(enabled: bool):
    if not enabled:
        yield None
        return
    with Progress(TextColumn("{task.description}"), BarColumn(), DownloadColumn(), TransferSpeedColumn(),
                  TimeElapsedColumn(), console=err, transient=False) as p:
        yield p


def table(title: str, columns: list[str], rows: list[list], styles: dict | None = None) -> None:
    t = Table(title=title, show_lines=False)
    for c in columns:
        t.add_column(c, justify="right" if c in ("seconds", "bytes", "GB/s", "elements", "count") else "left")
    for r in rows:
        t.add_row(*[str(x) for x in r])
    out.print(t)


def human_bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{n} B"
        n /= 1024
    return str(n)
