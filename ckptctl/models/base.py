"""What every model family provides to the planner, and the key grammar they share.

A key is `<stack>.layers.<i>.<rest>` (a layer tensor; `i` local in a rank file, global in the store) or a
top-level key placed on the first ("pre") or last ("post") pipeline chunk. Expert tensors carry an
expert index inside `rest`; the store stacks experts on a leading axis.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

from ckptctl.errors import BadInput, UnknownKey
from ckptctl.layout import Layout
from ckptctl.models.config import ModelConfig
from ckptctl.models.rules import Rule

_LAYER = re.compile(r"^(?P<stack>[a-z_]+)\.layers\.(?P<idx>\d+)\.(?P<rest>.+)$")
EXTRA_STATE = "_extra_state"


@dataclass(frozen=True)
class KeyLoc:
    section: str          # "pre" | "layer" | "post"
    stack: str = ""       # "decoder", "encoder" for layer keys
    layer: int = -1
    rest: str = ""        # the key below the layer prefix (or the whole key when not a layer key)

    def key(self, layer: int | None = None) -> str:
        if self.section != "layer":
            return self.rest
        return f"{self.stack}.layers.{self.layer if layer is None else layer}.{self.rest}"


def parse_key(key: str, post_prefixes: tuple[str, ...]) -> KeyLoc:
    m = _LAYER.match(key)
    if m:
        return KeyLoc("layer", m["stack"], int(m["idx"]), m["rest"])
    if key.startswith(post_prefixes):
        return KeyLoc("post", rest=key)
    return KeyLoc("pre", rest=key)


def match_rule(table, rest: str, cfg: ModelConfig, key: str) -> Rule:
    """First matching (regex, rule-or-callable) of a family table; unknown names are errors, never dropped."""
    for pattern, rule in table:
        if pattern.fullmatch(rest):
            return rule(cfg) if callable(rule) else rule
    raise UnknownKey(key)


class Family:
    """Base of every family. Subclasses set tables and override what differs."""

    name = "base"
    post_prefixes: tuple[str, ...] = ()
    stacks: tuple[str, ...] = ("decoder",)
    mtp = False           # whether the family knows multi-token prediction layers (`mtp.layers.<i>.`)

    def locate(self, key: str) -> KeyLoc:
        loc = parse_key(key, self.post_prefixes)
        if not self.mtp and (loc.stack == "mtp" or key.startswith("mtp.")):
            raise BadInput(f"tensor {key!r}: multi-token prediction (MTP) layers are not supported for {self.name}")
        return loc

    def rule(self, loc: KeyLoc, cfg: ModelConfig) -> Rule:  # pragma: no cover - abstract
        raise NotImplementedError

    def expert_of(self, rest: str) -> tuple[str, int] | None:
        """(rest with the expert index replaced by `{e}`, local expert index) or None."""
        return None

    def expert_array(self, pattern: str) -> str:
        """The store array's `rest` for an expert key pattern (experts stacked on axis 0)."""
        raise NotImplementedError

    def stack_layers(self, cfg: ModelConfig) -> dict[str, int]:
        return {"decoder": cfg.num_layers}

    def tied_copies(self, cfg: ModelConfig) -> dict[str, str]:
        """Keys that are byte copies of another key (tied output layer on the last stage)."""
        return {}

    def emits_copy(self, key: str, cfg: ModelConfig, layout: Layout) -> bool:
        """Whether a tied copy is present in a checkpoint of this layout."""
        return False

    def validate(self, cfg: ModelConfig, layout: Layout) -> None:
        pass

    def section_rank(self, loc: KeyLoc) -> float:
        """Where a key's section sorts in state-dict order: top-level keys before the layers, then after."""
        return {"pre": 0, "layer": 1, "post": 2}[loc.section]

    def also_on(self, loc: KeyLoc, cfg: ModelConfig, layout: Layout) -> list[tuple[int, int]]:
        """Further (pp stage, vpp chunk)s holding a byte copy of a top-level key under the same name (the MTP
        stage's word embedding); the copies are replicas of the key's one store array."""
        return []

    def optimizer_state(self, rest: str) -> bool:
        """Whether a model tensor is a trainable parameter with optimizer state (not a buffer).

        Default: every tensor but megatron-core's known fp32 router buffers (DESIGN §4.3)."""
        return not rest.endswith(("router.expert_bias", "router.qb_beta", "local_tokens_per_expert"))

    def layout_args(self, args: dict, cfg: ModelConfig, layout: Layout) -> dict:
        """Family-specific `args` fields a run at `layout` carries, after the generic rewrite (a hybrid
        model's `|` pattern segments follow PP*VPP). Called by convert's target side and `example`."""
        from ckptctl.pipeline import with_split_args
        return with_split_args(args, layout)

    def object_shard(self, loc: KeyLoc, layout: Layout, fc) -> str | None:
        """Which shard an `_extra_state` belongs to, as text (None: its module's TP or ETP rank)."""
        return None

    # `ckptctl example`: family defaults over example.DEFAULTS, and args extras from the options.
    example_defaults: dict = {}

    def example_extra(self, opts: dict) -> dict:
        """Family-specific `args` fields (ModelConfig.extra) of an example built with `opts`."""
        return {}

    def global_keys(self, cfg: ModelConfig) -> list[tuple[str, tuple[int, ...]]]:  # pragma: no cover
        """Every global tensor key of a freshly built model, in state-dict order, with global shapes."""
        raise NotImplementedError

    def layer_ranges(self, cfg: ModelConfig, layout: Layout) -> dict[str, list[list[range]]]:
        from ckptctl.layout import stage_layers
        from ckptctl.pipeline import split_of
        from ckptctl.models.deepseek import MTP_STACK, mtp_ranges
        sp = split_of(cfg, layout)     # the target's split when the layout carries one, else the args'
        return {s: mtp_ranges(cfg, layout) if s == MTP_STACK else stage_layers(n, layout, sp.first, sp.last, sp.layout)
                for s, n in self.stack_layers(cfg).items()}
