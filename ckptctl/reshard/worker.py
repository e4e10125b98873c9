"""Entry point of one torchrun worker: `python -m ckptctl.reshard.worker JOB.json`.

A failing worker writes its error where the launcher finds it and exits non-zero; torchrun then
stops the others, so the user sees one clear message instead of a hang.
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


if __name__ == "__main__":
    sys.exit(main(sys.argv))
