"""With CKPTCTL_PROFILE=DIR: wall-clock spans of phases and their steps, one JSON line each in
DIR/phases.jsonl ({"rank", "phase", "start", "end"}), to place every worker's profile and the CLI's own
stamps on one time line (docs/performance.md). Without it: nothing, at the cost of one lookup."""
from __future__ import annotations

import json
import os
import time
from pathlib import Path


def span(rank, name: str, start: float) -> None:
    """Record `name` on `rank` (a worker's rank, or "cli") from `start` (time.time()) until now."""
    where = os.environ.get("CKPTCTL_PROFILE")
    if where:
        Path(where).mkdir(parents=True, exist_ok=True)
        with open(Path(where) / "phases.jsonl", "a") as f:
            f.write(json.dumps({"rank": rank, "phase": name, "start": start, "end": time.time()}) + "\n")
