"""`matrix`: sweep layout pairs (example -> convert -> verify) and tabulate the results."""
from __future__ import annotations

import shutil
import tempfile
import time
from pathlib import Path

from ckptctl.errors import BadInput, CkptctlError
from ckptctl.layout import parse_layout
from ckptctl.formats import registry
from ckptctl.models import family_names, get_family


def default_pairs(model: str) -> list[tuple[str, str, str, dict]]:
    fams = family_names() if model == "all" else [model]
    out = []
    for f in fams:
        fam = get_family(f)
        for s, d, opts in getattr(fam, "matrix_pairs", []):
            out.append((f, s, d, opts))
        # each format's rows across formats (the families know none), in a fixed order
        for fmt in sorted(registry.formats(), key=lambda x: (x.detect_order, x.name), reverse=True):
            for s, d, opts in fmt.matrix_pairs.get(f, []):
                out.append((f, s, d, opts))
    if not out:
        raise BadInput(f"no matrix pairs for model {model!r}")
    return out


def parse_pairs(model: str, text: str) -> list[tuple[str, str, str, dict]]:
    if model == "all":
        raise BadInput("--pairs needs one --model")
    out = []
    for item in text.split(","):
        if ":" not in item:
            raise BadInput(f"Expected SRC:DST layout pairs like tp2pp4:tp4pp2, got {item!r}")
        s, d = item.strip().split(":", 1)
        parse_layout(s), parse_layout(d)
        out.append((model, s, d, {}))
    return out


def run_pair(family: str, src: str, dst: str, opts: dict, root: Path, nproc: int | None, progress) -> dict:
    from ckptctl.convert import convert
    from ckptctl.example import example
    from ckptctl.verify import verify

    label = f"{src}->{dst}" + ("" if not opts else " " + ",".join(f"{k}={v}" for k, v in opts.items()))
    row = {"family": family, "pair": label, "result": "FAIL", "seconds": 0.0, "bytes": 0, "gbps": 0.0}
    d = root / f"{family}-{src}-{dst}-{abs(hash(label)) % 10**6}"
    shutil.rmtree(d, ignore_errors=True)
    try:
        # opts "format" / "to_format": source and target checkpoint formats (legacy, torch_dist).
        res = example(family, parse_layout(src), d / "src", opts, optimizer=opts.get("optimizer"), fmt=opts.get("format"))
        if "format" not in res:     # written directly (a converted example carries no optimizer by default)
            row["optimizer"] = res.get("optimizer")
        t0 = time.monotonic()
        first = d / "src"
        if opts.get("via"):   # through a format without a layout (hf): A -> via -> B, and B -> A back
            convert(first, d / "via", None, nproc=nproc, progress=progress, to_format=opts["via"])
            first = d / "via"
        rep = convert(first, d / "dst", parse_layout(dst), nproc=nproc, progress=progress,
                      to_format=opts.get("to_format"))
        row["seconds"] = time.monotonic() - t0
        row["bytes"] = rep.bytes
        row["gbps"] = rep.bytes / row["seconds"] / 1e9 if row["seconds"] else 0.0
        weights_only = bool(opts.get("via"))   # a Hugging Face folder carries no training state
        v = verify(d / "src", d / "dst", weights_only=weights_only)
        row["tensors"] = v.tensors
        # A -> B -> A must give back every byte, vocab padding rows included (DESIGN §10).
        convert(d / "dst", d / "back", parse_layout(src), nproc=0)
        back = verify(d / "src", d / "back", weights_only=weights_only)
        padding = [x for x in back.allowed if "vocab padding" in x["reason"]]
        row["round_trip"] = "pass" if back.ok and not padding else "FAIL"
        row["result"] = "pass" if v.ok and row["round_trip"] == "pass" else "FAIL"
        bad = v.differences + back.differences
        if bad:
            row["detail"] = "; ".join(f"{x.key}: {x.reason}" for x in bad[:3])
        elif padding:
            row["detail"] = "round trip changed vocab padding rows"
    except CkptctlError as e:
        row["detail"] = str(e)[:200]
    finally:
        shutil.rmtree(d, ignore_errors=True)
    return row


def run_matrix(model: str, pairs: str | None, nproc: int | None, workdir: Path | None, progress=None,
               optimizer: bool = True) -> list[dict]:
    """`optimizer`: examples carry optimizer state (ckptctl.optstate.example default kind) that convert and verify
    cover; False: examples without it (`--no-optimizer`)."""
    todo = parse_pairs(model, pairs) if pairs else default_pairs(model)
    if not optimizer:
        todo = [(f, s, d, {**o, "optimizer": "none"}) for f, s, d, o in todo]
    tmp = None
    if workdir is None:
        tmp = tempfile.mkdtemp(prefix="ckptctl-matrix-")
        root = Path(tmp)
    else:
        root = Path(workdir)
        root.mkdir(parents=True, exist_ok=True)
    try:
        return [run_pair(f, s, d, o, root, nproc if nproc is not None else 2, progress) for f, s, d, o in todo]
    finally:
        if tmp:
            shutil.rmtree(tmp, ignore_errors=True)
