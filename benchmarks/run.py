"""ckptctl benchmark: convert vs `cp -r` (the floor) vs a naive single-process converter.

    pip install matplotlib          # only for the plot; the table and JSON need nothing extra
    python benchmarks/run.py                          # ~2 GB bf16 GPT, tp2pp2 -> tp4pp1
    python benchmarks/run.py --sizes 2,6 --workers 1,2,4 --work /path/with/space

For every size: make a synthetic checkpoint (benchmarks/gen.py, streamed), then time `cp -r`, a tiny
conversion (the fixed start-up), `ckptctl convert` at each worker count, the same tiny conversion
through the torchrun launcher, the naive converter, `ckptctl verify` (one process and --nproc N) and `ckptctl digest` of the source (1 and N workers). `--store-modes ref,copy`: each
convert with the default hidden store (`ref`: chunks reference the source's bytes, ckptctl.storage.refs) and
with `--store` beside the output (`copy`: a self-contained store, every byte written twice); the peak extra
disk of each (the hidden work folder without its output, plus the store) is polled. Peak RSS is measured for
every process of each command (the CLI, every worker; the torchrun agent where used) by polling the
process tree and reading each process's VmHWM. --repeat N keeps the fastest of N runs. Prints a
table; writes results.json and results.png into --out.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
CKPTCTL = [sys.executable, "-m", "ckptctl"]

sys.path.insert(0, str(ROOT))   # this checkout's ckptctl, as the commands timed below run it
from ckptctl.paths import tree_bytes  # noqa: E402


class Monitor:
    """Polls a process tree: per-process peak RSS (VmHWM) and the peak of the summed current RSS."""

    def __init__(self, pid: int, interval: float = 0.05):
        self.root, self.interval = psutil.Process(pid), interval
        self.peaks: dict[int, dict] = {}
        self.total_peak = 0
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._loop, daemon=True)
        self._t.start()

    @staticmethod
    def _role(p: psutil.Process) -> str:
        s = " ".join(p.cmdline())
        with open(f"/proc/{p.pid}/comm") as f:
            forked = f.read().startswith("ckptctl-w")      # workers forked by ckptctl.reshard.launch
        if forked or "ckptctl.reshard.worker" in s:        # or started by torchrun
            return "worker"
        if "torch.distributed.run" in s:
            return "agent"
        return "main"

    def _loop(self):
        while not self._stop.is_set():
            try:
                procs = [self.root] + self.root.children(recursive=True)
            except psutil.Error:
                procs = []
            total = 0
            for p in procs:
                try:
                    with open(f"/proc/{p.pid}/status") as f:
                        st = dict(line.split(":", 1) for line in f if ":" in line)
                    hwm = int(st["VmHWM"].split()[0]) << 10
                    rss = int(st["VmRSS"].split()[0]) << 10
                    anon = int(st.get("RssAnon", "0 kB").split()[0]) << 10
                    if p.pid not in self.peaks:
                        self.peaks[p.pid] = {"role": "main", "hwm": 0, "anon": 0}
                    e = self.peaks[p.pid]
                    if e["role"] != "worker" and p.pid != self.root.pid:   # a fork is named just after it starts
                        e["role"] = self._role(p)
                    e["hwm"] = max(e["hwm"], hwm)
                    e["anon"] = max(e["anon"], anon)
                    total += rss
                except (OSError, KeyError, ValueError, psutil.Error):
                    continue
            self.total_peak = max(self.total_peak, total)
            time.sleep(self.interval)

    def stop(self) -> dict:
        self._stop.set()
        self._t.join()
        workers = [e for e in self.peaks.values() if e["role"] == "worker"]
        main = [e for e in self.peaks.values() if e["role"] != "worker"]
        return {
            "peak_rss_max": max((e["hwm"] for e in self.peaks.values()), default=0),
            "peak_rss_worker_max": max((e["hwm"] for e in workers), default=0),
            "peak_anon_worker_max": max((e["anon"] for e in workers), default=0),
            "peak_rss_workers_sum": sum(e["hwm"] for e in workers),
            "peak_rss_main": max((e["hwm"] for e in main), default=0),
            "peak_rss_total_sampled": self.total_peak,
            "processes": len(self.peaks),
        }


REPEAT = 1      # --repeat: each command runs this many times and the fastest run is kept


def best(cmd: list[str], env: dict | None = None, before=None, disk: tuple | None = None) -> dict:
    """The fastest of REPEAT runs (the machine may be shared: other load only ever adds time);
    `before()` runs ahead of each (clearing an output folder). Peaks are those of the kept run."""
    runs = []
    for _ in range(REPEAT):
        if before is not None:
            before()
        runs.append(measure(cmd, env, disk))
    r = min(runs, key=lambda r: r["seconds"])
    r["all_seconds"] = [x["seconds"] for x in runs]
    return r


class DiskPeak:
    """Polls the bytes a convert writes beside its output: every hidden work folder `.NAME.ckptctl-*` of
    `dst` without its `out` subtree (the output before its rename), plus `extra` paths (a --store)."""

    def __init__(self, dst: Path, extra: list[Path] = (), interval: float = 0.02):
        self.dst, self.extra, self.interval, self.peak = Path(dst), list(extra), interval, 0
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._loop, daemon=True)
        self._t.start()

    def _loop(self):
        while not self._stop.is_set():
            n = sum(tree_bytes(w, w / "out") for w in self.dst.parent.glob(f".{self.dst.name}.ckptctl-*"))
            n += sum(tree_bytes(p) for p in self.extra)
            self.peak = max(self.peak, n)
            self._stop.wait(self.interval)

    def stop(self) -> int:
        self._stop.set()
        self._t.join()
        return self.peak


def measure(cmd: list[str], env: dict | None = None, disk: tuple | None = None) -> dict:
    """`disk`: (dst, [extra paths]) to poll for the peak extra disk (DiskPeak)."""
    env = dict(env or os.environ)
    env["PYTHONPATH"] = os.pathsep.join(x for x in (str(ROOT), env.get("PYTHONPATH")) if x)   # this checkout's ckptctl
    t0 = time.monotonic()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, text=True)
    mon = Monitor(proc.pid)
    dpk = DiskPeak(*disk) if disk else None
    out, err = proc.communicate()
    secs = time.monotonic() - t0
    mem = mon.stop()
    if dpk is not None:
        mem["peak_extra_disk"] = dpk.stop()
    if proc.returncode not in (0,):
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}): {err.strip()[-600:]}")
    return {"seconds": round(secs, 3), **mem, "stdout": out[-2000:]}


def du(path: Path) -> int:
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())


PARTIAL: Path | None = None     # rows so far, written after every command (a run cut short keeps them)


def _partial(rows: dict) -> None:
    if PARTIAL is not None:
        PARTIAL.write_text(json.dumps({k: {a: b for a, b in v.items() if a != "stdout"} for k, v in rows.items()}))


def bench_size(size: float, workers: list[int], work: Path, src_layout: str, dst_layout: str, dtype: str,
               max_memory: str | None, skip_naive: bool, profile: bool = False, modes: tuple = ("ref",)) -> dict:
    py = sys.executable
    src = work / f"src-{size}"
    print(f"\n== {size} GB {dtype} GPT, {src_layout} -> {dst_layout} ==", flush=True)
    g = measure([py, str(HERE / "gen.py"), "--size-gb", str(size), "--layout", src_layout, "--dtype", dtype,
                 "--out", str(src)])
    gen = json.loads(g["stdout"].strip().splitlines()[-1])
    nbytes = du(src)
    print(f"generated {nbytes / 1e9:.2f} GB in {g['seconds']:.1f} s ({gen['options']})", flush=True)
    rows = {}

    def clean(p):
        shutil.rmtree(p, ignore_errors=True)

    # cp -r twice: the first also warms the page cache for everyone after it
    clean(work / "cp")
    measure(["cp", "-r", str(src), str(work / "cp")])     # warms the page cache for everyone after it
    rows["cp -r"] = best(["cp", "-r", str(src), str(work / "cp")], before=lambda: clean(work / "cp"))
    clean(work / "cp")
    tiny = work / "tiny"
    clean(tiny)
    measure([*CKPTCTL, "example", "gpt", "--layout", src_layout, "--out", str(tiny), "--dtype", dtype])
    mm = ["--max-memory", max_memory] if max_memory else []
    tiny_cmd = [*CKPTCTL, "convert", str(tiny), str(work / "tiny-out"), "--to", dst_layout, "--json"]
    for n in workers:
        rows[f"startup {n}w"] = best([*tiny_cmd, "--nproc", str(n)], before=lambda: clean(work / "tiny-out"))
        for mode in modes:
            st = ["--store", str(work / "store.zarr")] if mode == "copy" else []
            r = best([*CKPTCTL, "convert", str(src), str(work / "out"), "--to", dst_layout, "--nproc", str(n),
                      "--json", *mm, *st], before=lambda: (clean(work / "out"), clean(work / "store.zarr")),
                     disk=(work / "out", [work / "store.zarr"]))
            clean(work / "store.zarr")
            name = f"convert {n}w" + ("" if mode == "ref" else f" {mode}")
            rows[name] = r
            _partial(rows)
            print(f"{name}: {r['seconds']:.1f} s (start-up {rows[f'startup {n}w']['seconds']:.1f} s), "
                  f"worker peak {r['peak_rss_worker_max'] / 2**20:.0f} MiB, peak extra disk "
                  f"{r['peak_extra_disk'] / 2**20:.1f} MiB ({100 * r['peak_extra_disk'] / nbytes:.2f} % of the "
                  "checkpoint)", flush=True)
    # the same tiny conversion through the torchrun agent (multi-node launcher): what forking saves
    n = max(workers)
    rows[f"startup {n}w torchrun"] = best([*tiny_cmd, "--nproc", str(n)], env=dict(os.environ, CKPTCTL_LAUNCHER="torchrun"),
                                          before=lambda: clean(work / "tiny-out"))
    rows["verify"] = best([*CKPTCTL, "verify", str(src), str(work / "out"), "--json", *mm])
    if n > 1:   # the same comparison spread over n forked workers (verify --nproc)
        rows[f"verify {n}p"] = best([*CKPTCTL, "verify", str(src), str(work / "out"), "--json", "--nproc", str(n), *mm])
    for k in sorted({1, n}):   # the layout-free digest of the source (one side, read once)
        rows[f"digest {k}p"] = best([*CKPTCTL, "digest", str(src), "--json", "--nproc", str(k), *mm])
    _partial(rows)
    prof = None
    if profile:
        p = measure([py, str(HERE / "prof.py"), str(src), "--to", dst_layout])
        prof = json.loads(p["stdout"].strip().splitlines()[-1])
        print("profile (1 process, no torchrun):", json.dumps(prof), flush=True)
    if not skip_naive:
        clean(work / "naive")
        rows["naive"] = best([py, str(HERE / "naive.py"), str(src), str(work / "naive"), "--to", dst_layout],
                             before=lambda: clean(work / "naive"))
        clean(work / "naive")
    clean(work / "out")
    clean(work / "tiny-out")
    clean(src)
    cp = rows["cp -r"]["seconds"]
    naive = rows.get("naive", {}).get("seconds")
    for name, r in rows.items():
        r.pop("stdout", None)
        r["gbps"] = round(nbytes / r["seconds"] / 1e9, 3)
        r["x_cp"] = round(r["seconds"] / cp, 2)
        if naive:
            r["x_naive"] = round(r["seconds"] / naive, 2)
        n = name.split()[1] if name.startswith("convert") else name.split()[-1]
        if "peak_extra_disk" in r:
            r["peak_extra_disk_pct"] = round(100 * r["peak_extra_disk"] / nbytes, 2)
        if name.startswith("convert") and f"startup {n}" in rows:
            beyond = r["seconds"] - rows[f"startup {n}"]["seconds"]
            r["beyond_startup_s"] = round(beyond, 3)
            r["beyond_startup_x_cp"] = round(beyond / cp, 2)
    return {"size_gb": size, "bytes": nbytes, "model": gen["options"], "src_layout": src_layout,
            "dst_layout": dst_layout, "generate_s": g["seconds"], "rows": rows, "profile": prof}


def table(res: dict) -> str:
    lines = []
    for s in res["sizes"]:
        lines.append(f"\n{s['bytes'] / 1e9:.2f} GB {s['model']['dtype']} ({s['model']['layers']} layers, hidden "
                     f"{s['model']['hidden']}), {s['src_layout']} -> {s['dst_layout']}, {res['cpus']} cores, "
                     f"load avg at start {res['loadavg'][0]:.1f}")
        lines.append(f"{'command':<22}{'seconds':>9}{'GB/s':>8}{'x cp':>7}{'x naive':>9}{'beyond start-up':>22}"
                     f"{'peak RSS max/proc':>19}{'sum workers':>13}{'extra disk':>12}")
        for name, r in s["rows"].items():
            b = f"{r['beyond_startup_s']:.1f} s ({r['beyond_startup_x_cp']:.2f}x cp)" if "beyond_startup_s" in r else ""
            lines.append(f"{name:<22}{r['seconds']:>9.2f}{r['gbps']:>8.3f}{r['x_cp']:>7.2f}"
                         f"{r.get('x_naive', float('nan')):>9.2f}{b:>22}{r['peak_rss_max'] / 2**20:>15.0f} MiB"
                         f"{r['peak_rss_workers_sum'] / 2**20:>9.0f} MiB"
                         + (f"{r['peak_extra_disk_pct']:>10.2f} %" if "peak_extra_disk_pct" in r else ""))
    return "\n".join(lines)


def plot(res: dict, path: Path) -> bool:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("(pip install matplotlib for the plot)")
        return False
    sizes = [s["bytes"] / 1e9 for s in res["sizes"]]
    names = [n for n in res["sizes"][0]["rows"] if not n.startswith("startup")]
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    for n in names:
        a.plot(sizes, [s["rows"][n]["seconds"] if n in s["rows"] else None for s in res["sizes"]], "o-", label=n)
        b.plot(sizes, [s["rows"][n]["peak_rss_max"] / 2**30 if n in s["rows"] else None for s in res["sizes"]], "o-", label=n)
    a.set(xlabel="checkpoint size (GB)", ylabel="wall time (s)", title="time")
    b.set(xlabel="checkpoint size (GB)", ylabel="peak RSS of one process (GiB)", title="peak memory")
    a.legend(fontsize=8)
    b.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    return True


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="2", help="checkpoint sizes in GB, comma-separated")
    ap.add_argument("--workers", default="1,2,4")
    ap.add_argument("--src", default="tp2pp2")
    ap.add_argument("--dst", default="tp4pp1")
    ap.add_argument("--dtype", default="bfloat16", help="bfloat16, or float32 for the fp32 variant")
    ap.add_argument("--max-memory", default=None, help="passed to ckptctl convert --max-memory")
    ap.add_argument("--work", default=None, help="scratch folder (default: a temporary folder under /tmp)")
    ap.add_argument("--out", default=str(HERE / "results"))
    ap.add_argument("--skip-naive", action="store_true")
    ap.add_argument("--repeat", type=int, default=1, help="runs of each command; the fastest is kept (shared machines)")
    ap.add_argument("--profile", action="store_true", help="also profile one in-process conversion (first size)")
    ap.add_argument("--store-modes", default="ref,copy",
                    help="ref: the default hidden store (references the source); copy: --store, self-contained")
    a = ap.parse_args(argv)
    global REPEAT
    REPEAT = max(1, a.repeat)
    import tempfile
    work = Path(a.work) if a.work else Path(tempfile.mkdtemp(prefix="ckptctl-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    global PARTIAL
    PARTIAL = out / "partial.json"
    res = {"cpus": os.cpu_count(), "loadavg": os.getloadavg(), "repeat": REPEAT, "ram_gib": round(psutil.virtual_memory().total / 2**30, 1),
           "workers": [int(x) for x in a.workers.split(",")], "sizes": []}
    t0 = time.monotonic()
    try:
        for size in [float(x) for x in a.sizes.split(",")]:
            res["sizes"].append(bench_size(size, res["workers"], work, a.src, a.dst, a.dtype, a.max_memory,
                                           a.skip_naive, a.profile and not res["sizes"],
                                           tuple(a.store_modes.split(","))))
    finally:
        if not a.work:
            shutil.rmtree(work, ignore_errors=True)
    res["total_s"] = round(time.monotonic() - t0, 1)
    (out / "results.json").write_text(json.dumps(res, indent=1))
    print(table(res))
    if plot(res, out / "results.png"):
        print(f"\nplot: {out / 'results.png'}")
    print(f"json: {out / 'results.json'}  (total {res['total_s']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
