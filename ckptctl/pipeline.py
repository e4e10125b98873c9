"""Pipeline splits: how many transformer layers each pipeline stage holds (DESIGN §4.1).

Megatron-LM offers three: even (the default), the first/last-stage counts
(`--decoder-first-pipeline-num-layers`, `--decoder-last-pipeline-num-layers`; the middle stages share
the rest evenly) and an explicit per-stage list (`--pipeline-model-parallel-layout`, megatron-core >=
0.13: `E` embedding, `t` transformer layer, `m` MTP layer, `L` loss, `|` between the PP*VPP stages,
`X*n` and `(...)*n` repeat, commas are cosmetic). A `Layout` carries the target's split; the source's
comes from its args. Pure arithmetic, no I/O.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

from ckptctl.errors import LayoutError

ARGS = ("decoder_first_pipeline_num_layers", "decoder_last_pipeline_num_layers", "pipeline_model_parallel_layout")
# megatron-core's TransformerConfig names for the first two (Megatron-LM copies the args into them)
CORE_ARGS = ("num_layers_in_first_pipeline_stage", "num_layers_in_last_pipeline_stage")
_UNROLL = (re.compile(r"\(([^)]+)\)\*(\d+)"), re.compile(r"(.)\*(\d+)"))


@dataclass(frozen=True)
class PipelineSplit:
    """`first`/`last`: layers on the first/last stage (None: that stage gets a middle share).
    `layout`: Megatron's explicit pipeline layout string (excludes first/last, as Megatron does)."""

    first: int | None = None
    last: int | None = None
    layout: str | None = None

    def __post_init__(self):
        for name in ("first", "last"):
            v = getattr(self, name)
            if v is not None and (not isinstance(v, int) or v <= 0):
                raise LayoutError(f"layers on the {name} pipeline stage must be a positive integer, got {v!r}")
        if self.layout is not None and (self.first is not None or self.last is not None):
            raise LayoutError("a pipeline layout cannot be combined with first/last-stage layer counts "
                              "(megatron-core refuses both)")

    @property
    def even(self) -> bool:
        return self.first is None and self.last is None and self.layout is None

    def __str__(self) -> str:
        if self.layout is not None:
            return f"layout {self.layout!r}"
        if self.even:
            return "even"
        return ", ".join(f"{n} stage {v}" for n, v in (("first", self.first), ("last", self.last)) if v is not None)

    def args(self) -> dict:
        """The Megatron-LM args fields of this split (None = unset)."""
        return dict(zip(ARGS, (self.first, self.last, self.layout)))

    def to_json(self) -> dict:
        return {"first": self.first, "last": self.last, "layout": self.layout}

    @classmethod
    def from_json(cls, d: dict | None) -> "PipelineSplit | None":
        return None if d is None else cls(d.get("first"), d.get("last"), d.get("layout"))

    @classmethod
    def from_args(cls, args: dict) -> "PipelineSplit":
        """The split a run's args describe (Megatron-LM's names first, megatron-core's as a fallback)."""
        first = args.get(ARGS[0]) or args.get(CORE_ARGS[0])
        last = args.get(ARGS[1]) or args.get(CORE_ARGS[1])
        layout = args.get(ARGS[2])
        if layout is not None and not isinstance(layout, str):
            layout = layout_text(layout)
        return cls(int(first) if first else None, int(last) if last else None, layout or None)


def layout_text(layout) -> str:
    """A list-of-lists pipeline layout (megatron-core's other accepted form) as its string form."""
    chars = {"embedding": "E", "decoder": "t", "mtp": "m", "loss": "L"}
    try:
        return "|".join("".join(chars[str(x).split(".")[-1].strip().lower()] for x in stage) for stage in layout)
    except (KeyError, TypeError):
        raise LayoutError(f"pipeline_model_parallel_layout {layout!r}: expected stages of "
                          "embedding/decoder/mtp/loss") from None


def parse_stages(text: str) -> list[str]:
    """The per-stage strings of a layout (repeats unrolled, commas dropped), as megatron-core parses them."""
    s = text.replace(",", "").replace(" ", "")
    for pattern in _UNROLL:
        s = pattern.sub(lambda m: m.group(1) * int(m.group(2)), s)
    stages = s.split("|")
    for st in stages:
        bad = set(st) - set("EtmL")
        if bad:
            raise LayoutError(f"pipeline layout {text!r}: unknown layer character(s) {''.join(sorted(bad))!r} "
                              "(known: E embedding, t transformer layer, m MTP layer, L loss)")
    return stages


def layout_ranges(text: str, num_layers: int, pp: int, vpp: int) -> list[list[range]]:
    """Global layer ranges result[pp][vpp] of an explicit layout; stage v*PP+p is chunk v of rank p."""
    stages = parse_stages(text)
    if len(stages) != pp * vpp:
        raise LayoutError(f"pipeline layout {text!r} has {len(stages)} stages but PP*VPP = {pp}*{vpp} = {pp * vpp}"
                          + (f" (give vpp{len(stages) // pp} in the layout)" if len(stages) % pp == 0 else ""))
    flat = "".join(stages)
    if "m" in flat:
        raise LayoutError(f"pipeline layout {text!r}: MTP layers ('m') are not supported")
    if flat.count("E") != 1 or not stages[0].startswith("E"):
        raise LayoutError(f"pipeline layout {text!r}: the embedding 'E' must open the first stage, once")
    if flat.count("L") != 1 or not stages[-1].endswith("L"):
        raise LayoutError(f"pipeline layout {text!r}: the loss 'L' must close the last stage, once")
    if flat.count("t") != num_layers:
        raise LayoutError(f"pipeline layout {text!r} places {flat.count('t')} transformer layers, the model has "
                          f"{num_layers}")
    out = [[range(0)] * vpp for _ in range(pp)]
    start = 0
    for s, st in enumerate(stages):
        n = st.count("t")
        out[s % pp][s // pp] = range(start, start + n)
        start += n
    return out


def split_of(cfg, layout) -> PipelineSplit:
    """The split in force: the layout's when it carries one (a target), else the model's own (args)."""
    if getattr(layout, "split", None) is not None:
        return layout.split
    return PipelineSplit(cfg.first_stage_layers, cfg.last_stage_layers,
                         cfg.extra.get("pipeline_model_parallel_layout") or None)


def resolve_target(family, cfg, to):
    """The target layout with its split decided and checked (LayoutError, exit 2, before any write).

    A split given for the target is used as is. Without one the source's is kept when it fits the
    target (so A -> A and grid-only changes keep the args); at PP 1 every split is the one stage; any
    other misfit asks for the target's split. Other refusals of the family come first, unchanged."""
    if to.split is not None:
        family.validate(cfg, to)
        return to
    try:
        family.validate(cfg, to)
        return to
    except LayoutError as e:
        refusal = e
    try:
        family.layer_ranges(cfg, to)
    except LayoutError as e:
        if str(e) != str(refusal):
            raise refusal from None                 # the family refuses the layout for another reason
    else:
        raise refusal
    own = split_of(cfg, to)
    if not own.even and to.pp == 1 and to.vpp == 1:
        fixed = to.with_(split=PipelineSplit())
        family.validate(cfg, fixed)
        return fixed
    raise LayoutError(f"{refusal}; the source's pipeline split is {own}: choose the target's with "
                      "--decoder-first-pipeline-num-layers / --decoder-last-pipeline-num-layers (0 = none) "
                      "or --pipeline-model-parallel-layout") from None


def with_split_args(args: dict, layout) -> dict:
    """`args` of a run at `layout` with its pipeline split written in (unchanged when the layout carries
    none: the args already describe the model's own split)."""
    sp = getattr(layout, "split", None)
    if sp is None:
        return args
    a = dict(args)
    a.update(sp.args())
    for core, v in zip(CORE_ARGS, (sp.first, sp.last)):
        if core in a:
            a[core] = v
    if not sp.even and layout.vpp > 1:
        # Megatron-LM takes VPP from the stage count with an uneven split, not from a per-stage layer count
        a["num_layers_per_virtual_pipeline_stage"] = None
        a["num_virtual_stages_per_pipeline_rank"] = layout.vpp
    return a


def with_options(to, first: int | None, last: int | None, layout: str | None):
    """`--to` plus convert's split options: any option given sets the target's whole split (an option
    left out is unset, as in Megatron-LM; 0 = unset, so `--decoder-first-pipeline-num-layers 0` asks
    for the even split)."""
    if first is None and last is None and not layout:
        return to
    if to is None:
        raise LayoutError("the pipeline split options need a target layout (--to)")
    for name, v in (("--decoder-first-pipeline-num-layers", first), ("--decoder-last-pipeline-num-layers", last)):
        if v is not None and v < 0:
            raise LayoutError(f"{name}: expected a layer count >= 0 (0 = unset), got {v}")
    return to.with_(split=PipelineSplit(first or None, last or None, layout or None))
