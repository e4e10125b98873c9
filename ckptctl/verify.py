"""`verify`: the reference gather of every global tensor from each checkpoint's rank files, compared
byte for byte (DESIGN §9). The store is never consulted: this is the independent check of convert.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from ckptctl.convert import Source, inspect
from ckptctl.errors import BadInput
from ckptctl.store import torch_dtype


@dataclass
class Difference:
    key: str
    reason: str
    dtype_a: str | None = None
    dtype_b: str | None = None
    shape_a: list | None = None
    shape_b: list | None = None
    count: int = 0
    first_index: int | None = None
    first_nd_index: list | None = None
    a_hex: str | None = None
    b_hex: str | None = None
    where: str | None = None


@dataclass
class VerifyReport:
    a: str
    b: str
    layout_a: str
    layout_b: str
    tensors: int = 0
    equal: int = 0
    bytes_compared: int = 0
    differences: list[Difference] = field(default_factory=list)
    allowed: list[dict] = field(default_factory=list)     # reported, fail only with --strict
    table: list[dict] = field(default_factory=list)       # one row per tensor
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return not self.differences

    def to_json(self) -> dict:
        d = asdict(self)
        d["ok"] = self.ok
        return d


class Gatherer:
    """Assembles global tensors of one checkpoint from its rank files (memory-mapped, opened once)."""

    def __init__(self, src: Source):
        self.src = src
        self.open = src.opener()
        self._units: dict[str, object] = {}
        self._files = {fp.dirname: fp for fp in src.plan.files}
        self.by_array: dict[str, list] = {}
        for fp in src.plan.files:
            for t in fp.tensors:
                for p, owned in zip(t.pieces, t.owned):
                    self.by_array.setdefault(p.array, []).append((fp.dirname, t, p, owned))

    def unit(self, dirname: str):
        """The opened rank file (legacy) or chunk reader (torch_dist), opened once."""
        if dirname not in self._units:
            self._units[dirname] = self.open(self._files[dirname])
        return self._units[dirname]

    def gather(self, array: str) -> tuple[torch.Tensor, list[Difference]]:
        spec = self.src.plan.arrays[array]
        out = torch.empty(spec["shape"], dtype=torch_dtype(spec["dtype"]))
        problems = []
        entries = self.by_array[array]
        for dirname, t, p, owned in sorted(entries, key=lambda e: not e[3]):   # owners first
            local = self.unit(dirname).tensor(t)[p.local.slices].reshape(p.gbox.sizes)
            if owned:
                out[p.gbox.slices] = local
                continue
            # A replica (TP copy of a norm, tied output copy, duplicated experts): must be byte-equal.
            ref = out[p.gbox.slices]
            d = _diff(ref, local)
            if d is not None:
                count, idx = d
                problems.append(Difference(array.removeprefix("model/"), "replica differs", count=count,
                                           first_index=idx, where=f"{dirname}/{t.chunk}[{t.key}]"))
        return out, problems


def _bytes(t: torch.Tensor) -> torch.Tensor:
    t = t.contiguous()
    return t.reshape(-1).view(torch.uint8).reshape(t.numel(), t.element_size()) if t.numel() else t.view(torch.uint8)


def _diff(a: torch.Tensor, b: torch.Tensor) -> tuple[int, int] | None:
    """(differing element count, first differing flat index), comparing raw bytes; None if equal."""
    ba, bb = _bytes(a), _bytes(b)
    if ba.numel() == 0:
        return None
    neq = (ba != bb).any(dim=1)
    count = int(neq.sum())
    if count == 0:
        return None
    return count, int(neq.nonzero()[0, 0])


def _hex(t: torch.Tensor, flat: int) -> str:
    return _bytes(t.reshape(-1)[flat:flat + 1]).flatten().flip(0).numpy().tobytes().hex()


def _nd(shape, flat: int) -> list[int]:
    idx = []
    for s in reversed(shape):
        idx.append(flat % s)
        flat //= s
    return list(reversed(idx))


def compare_arrays(name: str, a: torch.Tensor, b: torch.Tensor, vocab: bool, rep: VerifyReport) -> None:
    key = name.removeprefix("model/")
    row = {"key": key, "dtype": str(a.dtype).removeprefix("torch."), "shape": list(a.shape), "status": "equal"}
    if a.dtype != b.dtype or (a.shape != b.shape and not vocab) or (vocab and a.shape[1:] != b.shape[1:]):
        rep.differences.append(Difference(key, "dtype or shape differs", str(a.dtype), str(b.dtype),
                                          list(a.shape), list(b.shape)))
        rep.table.append({**row, "status": "dtype/shape differs"})
        return
    if vocab and a.shape[0] != b.shape[0]:
        # Padded vocab rows: compare the common rows; rows only one side has are padding.
        n = min(a.shape[0], b.shape[0])
        longer, which = (a, "a") if a.shape[0] > b.shape[0] else (b, "b")
        extra = longer[n:]
        if which == "b" and bool((_bytes(extra) != 0).any()):
            rep.differences.append(Difference(key, "padding rows added by the target are not zero",
                                              shape_a=list(a.shape), shape_b=list(b.shape)))
        else:
            rep.allowed.append({"key": key, "reason": f"vocab padding rows {n}..{longer.shape[0]} exist only in {which}"})
        a, b = a[:n], b[:n]
        row["status"] = "equal (common vocab rows)"
    d = _diff(a, b)
    rep.bytes_compared += a.numel() * a.element_size()
    if d is None:
        rep.equal += 1
    else:
        count, flat = d
        rep.differences.append(Difference(key, "bytes differ", str(a.dtype), str(b.dtype), list(a.shape),
                                          list(b.shape), count, flat, _nd(a.shape, flat), _hex(a, flat), _hex(b, flat)))
        row["status"] = f"{count} elements differ"
    rep.table.append(row)


def verify(a: Path, b: Path, true_vocab: int | None = None) -> VerifyReport:
    import time
    t0 = time.monotonic()
    sa, sb = inspect(Path(a), true_vocab), inspect(Path(b), true_vocab)
    if sa.family != sb.family:
        raise BadInput(f"{a} holds a {sa.family} model, {b} a {sb.family} model")
    rep = VerifyReport(str(a), str(b), str(sa.layout), str(sb.layout))
    ga, gb = Gatherer(sa), Gatherer(sb)
    names_a, names_b = set(sa.plan.arrays), set(sb.plan.arrays)
    for name in sorted(names_a - names_b):
        rep.differences.append(Difference(name.removeprefix("model/"), f"only in {a}"))
    for name in sorted(names_b - names_a):
        rep.differences.append(Difference(name.removeprefix("model/"), f"only in {b}"))
    for name in _ordered(sa, names_a & names_b):
        rep.tensors += 1
        ta, pa = ga.gather(name)
        tb, pb = gb.gather(name)
        for p in pa + pb:
            rep.differences.append(p)
        compare_arrays(name, ta, tb, sa.plan.arrays[name].get("vocab", False), rep)
        del ta, tb
    from ckptctl import optim
    optim.verify_optimizer(sa, sb, rep)
    _compare_state(sa, sb, rep)
    rep.seconds = round(time.monotonic() - t0, 3)
    return rep


def _ordered(src: Source, names: set[str]) -> list[str]:
    return [n for n in src.plan.arrays if n in names]


def _compare_state(sa: Source, sb: Source, rep: VerifyReport) -> None:
    """Non-tensor state: iteration and version must match; rewritten args and RNG are reported."""
    first_a = sa.common_state()
    first_b = sb.common_state()
    for k in ("iteration", "checkpoint_version"):
        if first_a.get(k) != first_b.get(k):
            rep.differences.append(Difference(k, f"differs: {first_a.get(k)!r} vs {first_b.get(k)!r}"))
    objs = sum(len(fp.objects) for fp in sa.plan.files)
    if objs:
        rep.allowed.append({"key": "_extra_state", "reason": f"{objs} entries listed, excluded from equality"})
    rep.allowed.append({"key": "rng_state", "reason": "per-rank RNG streams are not compared"})
    aa, ab = sa.ckpt.args, sb.ckpt.args
    changed = sorted(k for k in set(aa) | set(ab) if repr(aa.get(k)) != repr(ab.get(k)))
    if changed:
        rep.allowed.append({"key": "args", "reason": "fields differ: " + ", ".join(changed)})
