"""verify's report layer: the verdict line by kind of difference, and where a differing element lives.

`verify.verify` finds differences in global coordinates; here they are sorted into kinds (tensors,
optimizer, state, replicas) and a differing element is traced back to the rank file (and the element
inside that file's tensor) that holds it on each side, so the user can open the bad bytes; optimizer
state through `verify_locate_optim`.
"""
from __future__ import annotations

from pathlib import Path

KINDS = ("tensors", "optimizer", "state", "replicas")
_IGNORED_STRICT = ("rng_state", "_extra_state")


def kind_of(d) -> str:
    key, reason = d.key, d.reason
    if reason == "replica differs":
        return "replicas"
    if key.startswith(("optimizer", "optim/")):
        return "optimizer"
    if key in ("iteration", "checkpoint_version", "args") or key.startswith("common"):
        return "state"
    return "tensors"


def strict_failures(rep) -> list[dict]:
    """Allowed differences that fail only with --strict (vocab padding rows, rewritten args ...)."""
    return [x for x in rep.allowed if x["key"] not in _IGNORED_STRICT]


def counts(rep) -> dict[str, int]:
    c = {k: 0 for k in KINDS}
    for d in rep.differences:
        c[kind_of(d)] += 1
    return c


def verdict(rep, strict: bool) -> tuple[bool, str]:
    """(failed, one line naming what differs by kind)."""
    c = counts(rep)
    strict_bad = strict_failures(rep) if strict else []
    failed = bool(rep.differences) or bool(strict_bad)
    scope = "weights only" if getattr(rep, "weights_only", False) else "weights, optimizer, state"
    head = (f"{rep.equal}/{rep.tensors} tensors byte-identical ({scope}), "
            f"{_h(rep.bytes_compared)} compared in {rep.seconds:.2f} s")
    if not failed:
        return False, f"EQUAL: {head}"
    parts = [f"{n} {k}" if k != "tensors" else f"{n} tensors" for k, n in c.items() if n]
    if strict_bad:
        pad = [x for x in strict_bad if x["reason"].startswith("vocab padding")]
        other = [x["key"] for x in strict_bad if x not in pad]
        what = ([f"vocab padding rows of {len(pad)} tensors ({pad[0]['key']} ...)"] if pad else []) + other
        parts.append("with --strict " + ", ".join(what))
    return True, f"DIFFERENT ({'; '.join(parts)}): {head}"


def _h(n: int) -> str:
    from ckptctl.output import human_bytes
    return human_bytes(n)


def locate(src, key: str, index: list[int] | None) -> dict | None:
    """The rank file, local tensor key and element of `src` (a `convert.Source`) holding global element
    `index` of model array `key`: {"file", "tensor", "local_index", "byte_offset"} (byte offset inside
    that local tensor's data), owner first. None when not a model array or no index."""
    if index is None:
        return None
    array = "model/" + key
    paths = {i["dirname"]: i["path"] for i in (src.inventories or [])}
    from ckptctl.store import torch_dtype
    from ckptctl.verify_locate_optim import element_of, flat_of
    import torch
    hits = []
    for fp in src.plan.files:
        for t in fp.tensors:
            for p, owned in zip(t.pieces, t.owned or (True,) * len(t.pieces)):
                local = element_of(p, index) if p.array == array else None
                if local is None:
                    continue
                size = torch.empty((), dtype=torch_dtype(t.dtype)).element_size()
                hits.append((not owned, {"file": paths.get(fp.dirname, fp.dirname), "tensor": f"{t.chunk}[{t.key}]",
                                         "local_index": local, "byte_offset": flat_of(local, t.shape) * size}))
    hits.sort(key=lambda h: h[0])
    return hits[0][1] if hits else None


def add_locations(rep, a: Path, b: Path, true_vocab: int | None = None, limit: int = 20) -> None:
    """Fill `where_a` / `where_b` of the first `limit` differing model and optimizer tensors (one inspect per
    side; the optimizer's files are read only when an optimizer tensor differs)."""
    todo = [d for d in rep.differences
            if d.first_nd_index is not None and kind_of(d) in ("tensors", "optimizer")][:limit]
    if not todo:
        return
    from ckptctl.convert import inspect
    from ckptctl.verify_locate_optim import Locator
    sa, sb = inspect(Path(a), true_vocab), inspect(Path(b), true_vocab)
    la, lb = Locator(sa), Locator(sb)
    for d in todo:
        if kind_of(d) == "optimizer":
            d.where_a, d.where_b = la(d.key, d.first_nd_index), lb(d.key, d.first_nd_index)
        else:
            d.where_a = locate(sa, d.key, d.first_nd_index)
            d.where_b = locate(sb, d.key, d.first_nd_index)
