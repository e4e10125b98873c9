"""A worker's progress: bytes done, in a file the launcher sums (cheap, no communication)."""
from __future__ import annotations

import threading
from pathlib import Path

from ckptctl.storage.commit import write_text

_EVERY = 0.2   # seconds between writes of the progress file


class Progress:
    """Bytes done by this worker, in a file the launcher sums (cheap, no communication).

    The file is written by a background thread, never by the worker's copy loop: replacing a small file
    is a journal operation, and while 16 workers fill the page cache with target bytes one such rename took
    ~130 ms on ext4 (lent 16-core host, 15 GB convert: 39 progress writes = 5.0 s of each worker's 12 s).
    `add(..., force=True)` (a phase's end) wakes the thread to write at once, without waiting for it: a
    phase's last write in the caller held the phase's final all-gather back by up to 1.5 s on a lent host
    (docs/performance.md). `close` writes the final count in the caller."""

    def __init__(self, workdir: str | None, rank: int):
        self.path = Path(workdir) / "progress" / f"rank{rank}" if workdir else None
        self.done, self._written = 0, 0
        self._lock = threading.Lock()         # one write at a time: an older count never lands last
        self._stop = threading.Event()
        self._wake = threading.Event()        # a phase's end: write now
        self._thread: threading.Thread | None = None
        if self.path:
            self.path.parent.mkdir(parents=True, exist_ok=True)

    def add(self, n: int, force: bool = False) -> None:
        self.done += n
        if not self.path:
            return
        if self._thread is None and not self._stop.is_set():
            self._thread = threading.Thread(target=self._loop, name="ckptctl-progress", daemon=True)
            self._thread.start()
        if force:
            self._wake.set()

    def close(self) -> None:
        """Stop the writer thread after a last write (the launcher reads the final count)."""
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self.path:
            self._flush()

    def _loop(self) -> None:
        while True:
            self._wake.wait(_EVERY)
            self._wake.clear()
            if self._stop.is_set():
                return   # close() writes the last count
            try:
                self._flush()
            except OSError:   # progress is advisory; the work goes on, the final flush reports
                pass

    def _flush(self) -> None:
        with self._lock:
            done = self.done
            if done != self._written:
                write_text(self.path, str(done))
                self._written = done
