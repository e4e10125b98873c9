"""Parallel layouts: parsing, rank grids, and which ranks write which legacy model file.

A layout is pure data. Everything here is arithmetic on it; nothing reads files.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, replace
from functools import cached_property

from ckptctl.errors import LayoutError
from ckptctl.pipeline import PipelineSplit, layout_ranges

_PART = re.compile(r"(tp|pp|vpp|ep|etp|dp|cp)(\d+)")
_ORDER = ("tp", "pp", "vpp", "ep", "etp", "dp", "cp")


@dataclass(frozen=True)
class Layout:
    """Sizes of each parallel dimension. `etp=None` means "same as tp"."""

    tp: int = 1
    pp: int = 1
    vpp: int = 1
    ep: int = 1
    etp: int | None = None
    dp: int | None = None      # None: the smallest DP the expert grid allows (1 for dense models)
    cp: int = 1
    # Layers per pipeline stage (ckptctl.pipeline). None: the model's own split (its args); a target
    # carries the split it is written with.
    split: PipelineSplit | None = None

    def __post_init__(self):
        for name in _ORDER:
            v = getattr(self, name)
            if v is not None and (not isinstance(v, int) or v < 1):
                raise LayoutError(f"Expected {name} to be a positive integer, got {v!r}")
        if self.dp is None:
            object.__setattr__(self, "dp", self.min_dp)
        if self.world % (self.expert_tp * self.ep * self.pp):
            raise LayoutError(
                f"layout {self}: world size {self.world} is not divisible by ETP*EP*PP = "
                f"{self.expert_tp * self.ep * self.pp}")

    @property
    def min_dp(self) -> int:
        """Megatron needs the world divisible by TP*CP*PP and by ETP*EP*PP: the least DP that allows both."""
        from math import lcm
        dense = self.tp * self.cp * self.pp
        return lcm(dense, self.expert_tp * self.ep * self.pp) // dense

    @property
    def expert_tp(self) -> int:
        return self.tp if self.etp is None else self.etp

    @property
    def world(self) -> int:
        return self.tp * self.cp * self.pp * self.dp

    @property
    def edp(self) -> int:
        return self.world // (self.expert_tp * self.ep * self.pp)

    def __str__(self) -> str:
        s = f"tp{self.tp}pp{self.pp}"
        if self.vpp > 1:
            s += f"vpp{self.vpp}"
        if self.ep > 1 or self.etp is not None:
            s += f"ep{self.ep}"
        if self.etp is not None:
            s += f"etp{self.etp}"
        if self.dp != self.min_dp:
            s += f"dp{self.dp}"
        if self.cp > 1:
            s += f"cp{self.cp}"
        return s

    def with_(self, **kw) -> "Layout":
        return replace(self, **kw)

    def to_json(self) -> dict:
        d = {k: getattr(self, k) for k in _ORDER}
        if self.split is not None:
            d["split"] = self.split.to_json()
        return d

    @classmethod
    def from_json(cls, d: dict) -> "Layout":
        return cls(**{k: d.get(k, None if k in ("etp", "dp") else 1) for k in _ORDER},
                   split=PipelineSplit.from_json(d.get("split")))

    # --- rank grids (DESIGN §2: order tp-cp-ep-dp-pp, fastest first) ---

    def dense_coords(self, rank: int) -> tuple[int, int, int]:
        """(tp, dp, pp) of a global rank on the dense grid (cp folded away)."""
        tp = rank % self.tp
        rest = rank // (self.tp * self.cp)
        return tp, rest % self.dp, rest // self.dp

    def expert_coords(self, rank: int) -> tuple[int, int, int]:
        """(etp, ep, edp) of a global rank on the expert grid."""
        etp = rank % self.expert_tp
        rest = rank // self.expert_tp
        return etp, rest % self.ep, (rest // self.ep) % self.edp

    @cached_property
    def model_files(self) -> tuple["FileCoord", ...]:
        """The legacy model directories this layout produces, in (pp, ep, tp) order.

        Writers are ranks with dp rank 0 or expert-dp rank 0; each directory is named by the
        writer's (dense tp, pp, ep) and holds the expert slice of its ETP rank.
        """
        found: dict[tuple[int, int, int], FileCoord] = {}
        for rank in range(self.world):
            tp, dp, pp = self.dense_coords(rank)
            etp, ep, edp = self.expert_coords(rank)
            if dp != 0 and edp != 0:
                continue
            key = (tp, pp, ep)
            fc = FileCoord(tp=tp, pp=pp, ep=ep, etp=etp)
            old = found.get(key)
            if old is not None and old.etp != etp:
                raise LayoutError(
                    f"layout {self} is not representable in the legacy format: directory "
                    f"{fc.dirname(self)} would hold two expert slices (ETP ranks {old.etp} and {etp})")
            found.setdefault(key, fc)
        return tuple(sorted(found.values(), key=lambda f: (f.pp, f.ep, f.tp)))


@dataclass(frozen=True)
class FileCoord:
    """Coordinates of one legacy model directory."""

    tp: int
    pp: int
    ep: int = 0
    etp: int = 0

    def dirname(self, layout: Layout) -> str:
        name = f"mp_rank_{self.tp:02d}"
        if layout.pp > 1:
            name += f"_{self.pp:03d}"
        if layout.ep > 1:
            name += f"_{self.ep:03d}"
        return name

    def to_json(self) -> dict:
        return {"tp": self.tp, "pp": self.pp, "ep": self.ep, "etp": self.etp}


def parse_layout(text: str, **overrides: int | None) -> Layout:
    """Parse `tp2pp4`, `tp2pp2vpp2`, `tp1pp1dp4`, `tp2pp1ep4etp1` (absent parts = 1). Parts may come in any
    order (`pp2tp4`, `tp4dp2pp1`, as Megatron users write them); each at most once."""
    s = (text or "").strip().lower()
    pos, seen = 0, {}
    for m in _PART.finditer(s):
        if m.start() != pos:
            break
        name = m.group(1)
        if name in seen:
            raise LayoutError(f"layout {text!r} gives {name} twice")
        seen[name], pos = int(m.group(2)), m.end()
    if pos != len(s) or (not seen and s):
        raise LayoutError(f"Expected a layout like 'tp2pp4', 'tp2pp2vpp2' or 'tp2pp1ep4etp1', got {text!r}")
    for k, v in overrides.items():
        if v is not None:
            seen[k] = v
    return Layout(**seen)


def stage_layers(num_layers: int, layout: Layout, first: int | None = None, last: int | None = None,
                 pattern: str | None = None) -> list[list[range]]:
    """Global layer ranges held by each (pp stage, vpp chunk): result[pp][vpp] (DESIGN §4.1).
    `pattern`: an explicit pipeline layout (ckptctl.pipeline), instead of first/last counts."""
    pp, vpp = layout.pp, layout.vpp
    if pattern:
        return layout_ranges(pattern, num_layers, pp, vpp)
    if not first and not last:
        if num_layers % (pp * vpp):
            raise LayoutError(
                f"{num_layers} layers do not divide into PP*VPP = {pp}*{vpp} = {pp * vpp} equal chunks")
        per = num_layers // (pp * vpp)
        return [[range(v * num_layers // vpp + p * per, v * num_layers // vpp + (p + 1) * per)
                 for v in range(vpp)] for p in range(pp)]
    a, b = first or 0, last or 0
    mid = pp - (1 if first else 0) - (1 if last else 0)
    rest = num_layers - a - b
    if mid < 0 or rest < 0 or (mid and rest % mid) or (not mid and rest):
        raise LayoutError(f"uneven pipeline split (first={a}, last={b}) does not fit {num_layers} layers on PP={pp}")
    if vpp > 1 and not mid:
        # megatron-core 0.19.2 divides by the middle stage count for VPP chunks (ZeroDivisionError)
        raise LayoutError(f"uneven pipeline split (first={a}, last={b}) on PP={pp} with VPP={vpp} leaves no middle "
                          "stage: megatron-core cannot build it")
    counts = []
    for p in range(pp):
        if first and p == 0:
            counts.append(a)
        elif last and p == pp - 1:
            counts.append(b)
        else:
            counts.append(rest // mid)
    if any(c % vpp for c in counts):
        raise LayoutError(f"stage layer counts {counts} are not divisible by VPP={vpp}")
    cf = [c // vpp for c in counts]
    out, per_v = [], sum(cf)
    for p in range(pp):
        start = sum(cf[:p])
        out.append([range(v * per_v + start, v * per_v + start + cf[p]) for v in range(vpp)])
    return out
