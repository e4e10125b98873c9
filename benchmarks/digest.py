"""ckptctl digest benchmark: the layout-free digest of a synthetic checkpoint and of its conversions,
at several worker counts, against `ckptctl verify --nproc` on the same pair.

    python benchmarks/digest.py                                  # 2 GB bf16 GPT tp2pp2, its tp4pp1 and torch_dist copies
    python benchmarks/digest.py --size-gb 8 --workers 1,4,16 --work /path/with/space --repeat 2

Per side and worker count: the wall time of the whole command (start-up included) and the digest's own
seconds (inspect, gather, hash, combine) from its --json, and GB/s over the canonical bytes hashed.
Every side must give the same root (the benchmark fails otherwise). Writes digest-results.json into --out.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
CKPTCTL = [sys.executable, "-m", "ckptctl"]


def timed(cmd: list[str]) -> tuple[float, dict]:
    t0 = time.monotonic()
    p = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.monotonic() - t0
    if p.returncode not in (0, 1):
        raise SystemExit(f"{' '.join(cmd)} failed ({p.returncode}): {p.stderr.strip()[-2000:]}")
    return wall, json.loads(p.stdout)


def best(cmd: list[str], repeat: int) -> tuple[float, dict]:
    runs = [timed(cmd) for _ in range(repeat)]
    return min(runs, key=lambda r: r[0])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size-gb", type=float, default=2.0)
    ap.add_argument("--layout", default="tp2pp2")
    ap.add_argument("--to", default="tp4pp1", help="layout of the legacy conversion")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--workers", default="1,4,16")
    ap.add_argument("--repeat", type=int, default=1, help="runs of each command; the fastest is kept")
    ap.add_argument("--work", default=None, help="scratch folder (default: a temporary folder under /tmp)")
    ap.add_argument("--out", default=str(HERE / "results"))
    ap.add_argument("--optimizer", action="store_true", help="with distributed-optimizer state (benchmarks/"
                    "gen_optim.py; --size-gb is then the whole checkpoint; give --layout with DP, e.g. tp2pp2dp2)")
    a = ap.parse_args(argv)
    import tempfile
    work = Path(a.work) if a.work else Path(tempfile.mkdtemp(prefix="ckptctl-digest-"))
    work.mkdir(parents=True, exist_ok=True)
    workers = [int(x) for x in a.workers.split(",")]
    conv_n = str(max(workers))
    res = {"cpus": os.cpu_count(), "loadavg": os.getloadavg(), "size_gb": a.size_gb, "layout": a.layout,
           "optimizer": a.optimizer,
           "dtype": a.dtype, "workers": workers, "rows": []}
    try:
        src, dst, dist = work / "src", work / "dst", work / "dist"
        gen = ["gen_optim.py"] if a.optimizer else ["gen.py", "--dtype", a.dtype]
        subprocess.run([sys.executable, str(HERE / gen[0]), *gen[1:], "--size-gb", str(a.size_gb), "--layout",
                        a.layout, "--out", str(src)], check=True, capture_output=True)
        for out, extra in ((dst, ["--to", a.to]), (dist, ["--to", a.layout, "--to-format", "torch_dist"])):
            subprocess.run(CKPTCTL + ["convert", str(src), str(out), "--nproc", conv_n, "-q", "--overwrite"] + extra,
                           check=True)
        roots = set()
        for name, path in (("src " + a.layout, src), ("legacy " + a.to, dst), ("torch_dist " + a.layout, dist)):
            for n in workers:
                wall, d = best(CKPTCTL + ["digest", str(path), "--nproc", str(n), "--json"], a.repeat)
                roots.add(d["root"])
                res["rows"].append({"side": name, "nproc": n, "wall_s": round(wall, 2), "digest_s": d["seconds"],
                                    "bytes": d["bytes"], "gbps": round(d["bytes"] / d["seconds"] / 1e9, 3),
                                    "root": d["root"]})
                print(f"{name:>22}  nproc {n:>2}: {wall:6.2f} s wall, {d['seconds']:6.2f} s digest, "
                      f"{d['bytes'] / 1e9:.2f} GB, {res['rows'][-1]['gbps']:.2f} GB/s", flush=True)
        wall, d = best(CKPTCTL + ["verify", str(src), str(dst), "--nproc", conv_n, "--json"], a.repeat)
        res["verify"] = {"nproc": int(conv_n), "wall_s": round(wall, 2), "seconds": d["seconds"],
                         "bytes_per_side": d["bytes_compared"],
                         "gbps_per_side": round(d["bytes_compared"] / d["seconds"] / 1e9, 3)}
        print(f"verify {a.layout} vs {a.to} nproc {conv_n}: {wall:.2f} s wall, {d['seconds']:.2f} s, "
              f"{res['verify']['gbps_per_side']:.2f} GB/s per side", flush=True)
        res["same_root"] = len(roots) == 1
    finally:
        if not a.work:
            shutil.rmtree(work, ignore_errors=True)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "digest-results.json").write_text(json.dumps(res, indent=1))
    print(f"same root on every side: {res['same_root']}; json: {out / 'digest-results.json'}")
    return 0 if res["same_root"] else 1


if __name__ == "__main__":
    sys.exit(main())
