"""Peak extra disk of one convert, measured as /work/shared/checks/zero-copy.sh sets it up (issue 13).

    sudo python benchmarks/peak_disk.py                      # ~290 MB bf16 GPT tp2pp2 -> tp4pp1 onto a tmpfs
    sudo python benchmarks/peak_disk.py --store-mode copy    # the same with a self-contained --store there

The source lives outside a fresh tmpfs (needs root); DST (and with `copy` the store) is written onto it.
The filesystem's used bytes are polled every ~2 ms while `ckptctl convert` runs: the peak minus what is
used once it is done (DST itself) is the extra disk the conversion needed. Prints one JSON line.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path


def used(path: Path) -> int:
    st = os.statvfs(path)
    return (st.f_blocks - st.f_bfree) * st.f_frsize


def tree(p: Path) -> int:
    return sum(f.stat().st_size for f in Path(p).rglob("*") if f.is_file())


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--ffn", type=int, default=4096)
    ap.add_argument("--to", default="tp4pp1")
    ap.add_argument("--nproc", type=int, default=2)
    ap.add_argument("--store-mode", choices=["ref", "copy"], default="ref")
    a = ap.parse_args(argv)
    t = Path(tempfile.mkdtemp(prefix="ckptctl-peak-"))
    fs = t / "fs"
    fs.mkdir()
    try:
        subprocess.run(["ckptctl", "example", "gpt", "--layout", "tp2pp2", "--hidden", str(a.hidden), "--layers",
                        str(a.layers), "--ffn", str(a.ffn), "--dtype", "bfloat16", "--optimizer", "none",
                        "--out", str(t / "src")], check=True, capture_output=True)
        ckpt = tree(t / "src")
        subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={3 * ckpt // 1024 + 65536}k", "tmpfs", str(fs)],
                       check=True, capture_output=True)
        base = used(fs)
        peak, stop = [0], threading.Event()

        def poll():
            while not stop.is_set():
                peak[0] = max(peak[0], used(fs) - base)
                time.sleep(0.002)
        th = threading.Thread(target=poll, daemon=True)
        th.start()
        st = ["--store", str(fs / "store.zarr")] if a.store_mode == "copy" else []
        t0 = time.monotonic()
        r = subprocess.run(["ckptctl", "convert", str(t / "src"), str(fs / "dst"), "--to", a.to, "--nproc",
                            str(a.nproc), *st], capture_output=True, text=True)
        secs = time.monotonic() - t0
        stop.set()
        th.join()
        if r.returncode:
            print(r.stderr[-500:], file=sys.stderr)
            return r.returncode
        subprocess.run(["rm", "-rf", str(fs / "store.zarr")])
        final = used(fs) - base            # DST alone (tmpfs counts whole pages)
        extra = peak[0] - final
        print(json.dumps({"checkpoint_bytes": ckpt, "dst_bytes": tree(fs / "dst"), "fs_used_after": final,
                          "fs_peak_used": peak[0], "peak_extra_bytes": extra,
                          "peak_extra_pct": round(100 * extra / ckpt, 2), "store_mode": a.store_mode,
                          "nproc": a.nproc, "convert_s": round(secs, 2)}))
    finally:
        subprocess.run(["umount", str(fs)], capture_output=True)
        subprocess.run(["rm", "-rf", str(t)])
    return 0


if __name__ == "__main__":
    sys.exit(main())
