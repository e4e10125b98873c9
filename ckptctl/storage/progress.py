"""A worker's progress: bytes done, in a file the launcher sums (cheap, no communication)."""
from __future__ import annotations

import time
from pathlib import Path

from ckptctl.storage.commit import write_text


class Progress:
    """Bytes done by this worker, in a file the launcher sums (cheap, no communication)."""

    def __init__(self, workdir: str | None, rank: int):
        self.path = Path(workdir) / "progress" / f"rank{rank}" if workdir else None
        self.done, self._last = 0, 0.0
        if self.path:
            self.path.parent.mkdir(parents=True, exist_ok=True)

    def add(self, n: int, force: bool = False) -> None:
        self.done += n
        now = time.monotonic()
        if self.path and (force or now - self._last > 0.2):
            self._last = now
            write_text(self.path, str(self.done))
