"""`ckptctl convert ... --dry-run`: the plan of a conversion, after every check a real run makes and
before any byte is written (no destination, no work folder).

`convert.convert` calls `plan` at the point where a real run would create its work folder, so the
checks are the real run's, not a copy of them.
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path

from ckptctl.formats import registry
from ckptctl.inspect_cmd import layout_json


def existing_ancestor(path: Path) -> Path:
    """The nearest folder that exists at or above `path` (where the bytes will land)."""
    p = Path(path).absolute()
    while not p.exists() and p != p.parent:
        p = p.parent
    return p


def disk_rows(writes: list[tuple[str, Path, int]]) -> list[dict]:
    """Bytes to write per filesystem against its free space. `writes`: (what, path, bytes)."""
    by_dev: dict[int, dict] = {}
    for what, path, n in writes:
        at = existing_ancestor(path)
        dev = os.stat(at).st_dev
        row = by_dev.setdefault(dev, {"filesystem_of": str(at), "writes": [], "bytes": 0,
                                      "free": shutil.disk_usage(at).free})
        row["writes"].append({"what": what, "path": str(path), "bytes": n})
        row["bytes"] += n
    for row in by_dev.values():
        row["fits"] = row["bytes"] <= row["free"]
    return list(by_dev.values())


def optimizer_bytes(info: dict | None, arrays: dict) -> int:
    """Global fp32 optimizer bytes (each component one fp32 per weight element), as the store holds them."""
    if not info:
        return 0
    elems = 0
    for a, s in arrays.items():
        if a.startswith("model/"):
            v = 1
            for d in s["shape"]:
                v *= d
            elems += v
    return elems * 4 * len(info["comps"])


def target_files(to, out_fmt: str, family, cfg, manifest, arrays, slots, iteration, optim_info=None) -> list[str]:
    """The files a target phase writes, relative to DST (the target format lists them)."""
    return registry.get(out_fmt).target_files(to, family, cfg, manifest, arrays, slots, iteration, optim_info)


def plan(*, src: Path, dst: Path, source_layout, to, family: str, cfg, out_fmt: str, src_fmt: str,
         weights: int, optim_info: dict | None, arrays: dict, manifest, slots, store: Path | None,
         to_store: bool, keep_store: bool, workers: int, nproc: int, max_memory: int | None,
         policies: dict, notes: list[str], from_store: bool = False, iteration="release") -> dict:
    """The dry-run report (JSON-able). Nothing here touches the disk but `stat`."""
    from ckptctl.models import get_family
    from ckptctl.reshard import stream
    opt = optimizer_bytes(optim_info, arrays)
    moved = weights + opt
    writes = []
    store_path = (Path(store) if store else dst.with_name(dst.name + ".zarr") if keep_store
                  else dst.parent / f".{dst.name}.ckptctl-<id>" / "store.zarr")
    if not from_store:
        kept = bool(store or keep_store or to_store)
        # a hidden store references the source's weight bytes (ckptctl.storage.refs): it writes the optimizer
        # state (rebuilt, so copied) and metadata, counted as 5 % of the weights like convert's space check
        writes.append(("store (Zarr pivot)" + (" kept" if kept else ", references the source, deleted after"),
                       dst if to_store else store_path, moved if kept else opt + weights // 20))
    files: list[str] = []
    if to is not None and not to_store:
        files = target_files(to, out_fmt, get_family(family), cfg, manifest, arrays, slots, iteration, optim_info)
        writes.append(("target checkpoint", dst, moved))
    budget = max_memory or stream.DEFAULT_MAX_MEMORY
    disks = disk_rows(writes)
    refusals = [f"not enough free space on the filesystem of {d['filesystem_of']}: {d['bytes']} bytes to write, "
                f"{d['free']} free" for d in disks if not d["fits"]]
    return {
        "ok": not refusals, "dry_run": True, "src": str(src), "dst": str(dst), "family": family,
        "source_layout": layout_json(source_layout), "target_layout": layout_json(to) if to is not None else None,
        "source_format": src_fmt, "target_format": None if to_store else out_fmt,
        "megatron_ckpt_format": None if to_store else registry.megatron_name(out_fmt),
        "phases": (["target"] if from_store else ["source"] if to_store else ["source", "target"]),
        "bytes": {"weights": weights, "optimizer": opt, "moved_per_phase": moved,
                  "written": sum(n for _, _, n in writes)},
        "target_files": files, "rank_files_out": len(to.model_files) if to is not None and not to_store else 0,
        "disk": disks, "workers": workers, "nproc_asked": nproc,
        "memory_per_worker": budget, "memory_total": budget * max(workers, 1),
        "state": policies, "notes": notes, "refusals": refusals,
        **({"error": refusals[0], "exit_code": 2} if refusals else {}),
    }


def render(d: dict, say) -> None:
    from ckptctl.output import human_bytes
    b = d["bytes"]
    tgt = d["target_layout"]["name"] if d["target_layout"] else "store"
    say(f"dry run: {d['family']} {d['source_layout']['name']} ({d['source_format']}) -> {tgt}"
        + (f" ({d['target_format']})" if d["target_format"] else "") + f"; nothing written")
    say(f"  moves       {human_bytes(b['moved_per_phase'])} per phase (weights {human_bytes(b['weights'])}, "
        f"optimizer {human_bytes(b['optimizer'])}); phases: {', '.join(d['phases'])}")
    if d["target_files"]:
        shown = d["target_files"][:8]
        more = f" ... (+{len(d['target_files']) - 8})" if len(d["target_files"]) > 8 else ""
        say(f"  files       {', '.join(shown)}{more}")
    for disk in d["disk"]:
        say(f"  disk        {human_bytes(disk['bytes'])} to write on the filesystem of {disk['filesystem_of']}, "
            f"{human_bytes(disk['free'])} free" + ("" if disk["fits"] else "  NOT ENOUGH"))
        for w in disk["writes"]:
            say(f"                {w['what']}: {w['path']} ({human_bytes(w['bytes'])})")
    say(f"  workers     {d['workers']} (asked {d['nproc_asked']}), memory budget {human_bytes(d['memory_per_worker'])} "
        f"per worker, {human_bytes(d['memory_total'])} in all")
    for k, v in d["state"].items():
        say(f"  {k}: {v}")
    for n in d["notes"]:
        say(f"  note: {n}")
    for r in d["refusals"]:
        say(f"  REFUSED: {r}")
