"""Digests kept and compared: the record `convert --digest` writes beside its output
(`DST/ckptctl-digest.json`, at DST's top level, where neither Megatron-LM's loaders nor ckptctl look for
checkpoint files), and the comparison of a digest with a record or with another digest, naming the
tensors and state whose hashes differ."""
from __future__ import annotations

import json
import os
from pathlib import Path

from ckptctl.digest import RECORD, DigestReport
from ckptctl.errors import BadInput


def write(rep: DigestReport, path: Path) -> Path:
    """Write the record of `rep` to `path` (a folder: its ckptctl-digest.json); temp file + rename, never a
    half-written record."""
    path = Path(path)
    if path.is_dir():
        path = path / RECORD
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    d = rep.to_json()
    d["record_of"] = d.pop("path")   # the checkpoint digested (convert: the source), as given
    tmp.write_text(json.dumps(d, indent=1, sort_keys=True) + "\n")
    os.replace(tmp, path)
    return path


def load(path: Path) -> dict:
    """A record written by `write` (a folder: its record), checked for what a comparison needs."""
    path = Path(path)
    if path.is_dir():
        path = path / RECORD
    try:
        d = json.loads(path.read_text())
    except FileNotFoundError:
        raise BadInput(f"{path}: no digest record (write one with `ckptctl digest CKPT --out FILE` or "
                       f"`ckptctl convert --digest`)") from None
    except (OSError, ValueError) as e:
        raise BadInput(f"{path}: not a readable digest record ({e})") from None
    if not isinstance(d, dict) or not {"root", "scheme", "tensors", "objects"} <= set(d):
        raise BadInput(f"{path}: not a ckptctl digest record (root, scheme, tensors, objects expected)")
    return d


def entries(d: dict) -> dict[str, str]:
    """name -> hash of every tensor and object of a digest (report JSON or record)."""
    out = {t["name"]: t["hash"] for t in d["tensors"]}
    out.update({k: v["hash"] for k, v in d["objects"].items()})
    return out


def differences(a: dict, b: dict) -> list[dict]:
    """What differs between two digests (JSON dicts): one row per name, sorted; [] when the roots agree."""
    if a.get("scheme") != b.get("scheme"):
        return [{"name": "scheme", "reason": f"digest schemes differ: {a.get('scheme')} vs {b.get('scheme')}"}]
    if a["root"] == b["root"]:
        return []
    ea, eb = entries(a), entries(b)
    rows = []
    for name in sorted(set(ea) | set(eb)):
        if name not in eb:
            rows.append({"name": name, "reason": "only in a"})
        elif name not in ea:
            rows.append({"name": name, "reason": "only in b"})
        elif ea[name] != eb[name]:
            rows.append({"name": name, "reason": "hash differs"})
    return rows


def render(d: dict, say, show_all: bool = False) -> None:
    """The text result: `ROOT  PATH` (as sha256sum), then a summary line and notes."""
    say(f"{d['root']}  {d['path']}")
    n_opt = sum(t["name"].startswith("optim/") for t in d["tensors"])
    from ckptctl.output import human_bytes, rate as speed
    rate = f", {speed(d['bytes'], d['seconds'])}" if d["seconds"] else ""
    say(f"{d['family']} {d['format']} {d['layout']}: {len(d['tensors'])} tensors ({n_opt} optimizer), "
        f"{len(d['objects'])} state entries, {human_bytes(d['bytes'])} hashed ({d['algorithm']}, "
        f"{human_bytes(d['block_bytes'])} blocks) in {d['seconds']:.2f} s with {d['nproc']} worker(s){rate}")
    if show_all:
        for t in d["tensors"]:
            say(f"  {t['hash']}  {t['name']}  {t['dtype']} {'x'.join(map(str, t['shape']))}")
    for r in d["replicas_differ"]:
        say(f"replica differs: {r['tensor']} in {r['where']} ({r['count']} elements; the owner's copy is hashed)")
    for note in d["notes"]:
        say(f"note: {note}")


def record_source(src: Path, dst: Path, rep, true_vocab, max_memory, nproc, progress=None) -> Path:
    """`convert --digest`: the source's digest written into the committed DST (never into the source),
    its root and seconds added to the convert report `rep`."""
    from ckptctl.digest import digest
    from ckptctl.reshard.launch import default_nproc
    d = digest(Path(src), true_vocab, max_memory, default_nproc() if nproc is None else nproc, progress)
    path = write(d, Path(dst))
    rep.timings["digest"] = d.seconds
    rep.notes.append(f"source digest {d.root} written to {path}" + (
        f" ({len(d.replicas_differ)} replica copies differ from their owners)" if d.replicas_differ else ""))
    return path


def same_state(a: Path, b: Path, true_vocab, max_memory, nproc: int, weights_only: bool = False, progress=None) -> dict:
    """`verify --digest`: both sides' digests (model arrays only with `weights_only`); {"equal", "a", "b",
    "differ", "seconds", "bytes"}. Equal digests end the verify; else its byte comparison runs."""
    from ckptctl.digest import digest
    da, db = (digest(Path(p), true_vocab, max_memory, nproc, progress).to_json() for p in (a, b))
    if weights_only:
        for d in (da, db):
            d["tensors"] = [t for t in d["tensors"] if t["name"].startswith("model/")]
            d["objects"], d["root"] = {}, ""
    differ = [r["name"] for r in differences({**da, "root": "a"}, {**db, "root": "b"})]
    return {"equal": not differ and not da["replicas_differ"] and not db["replicas_differ"], "a": da["root"],
            "b": db["root"], "differ": differ, "tensors": len(da["tensors"]), "bytes": sum(t["bytes"] for t in da["tensors"]),
            "seconds": round(da["seconds"] + db["seconds"], 3)}
