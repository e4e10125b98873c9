"""megatron-core's parameter order, derived from the model (issue 10), never from a file's key order.

The order of parameters decides where each one sits in the distributed optimizer's flat buffers
(megatron-core 0.19.2 `DistributedDataParallel` collects `module.named_parameters()` and
`_ParamAndGradBuffer` / `DistributedOptimizer._compute_per_buffer_param_layout` lay them out in reverse)
and which Adam state index belongs to which parameter. `named_parameters()` walks the modules in
registration order, each module's own parameters before its children's; that is the order of a fresh
model's state dict, which each family writes down once in `Family.global_keys(cfg)` (the keys
`ckptctl example` emits, checked against megatron-core's). The order here is positions in that list:

* a key of the fresh model: its index;
* TE's fused norm (`<linear>.layer_norm_weight` / `_bias`): just before `<linear>.weight` (TE's
  LayerNormLinear registers its norm parameters before the linear's);
* a parameter the fresh model of this config lacks (a tied copy: `output_layer.weight` on the last stage of
  a tied model; an option the config read from args does not carry, e.g. `shared_experts.gate_weight`):
  just before the first key of its module, because `named_parameters()` gives a module's own parameters
  before its children's (and a module's other entries, bias or extra state, follow its weight).

* optional attention submodules the fresh-model keys leave out, by megatron-core 0.19.2's construction
  order: `core_attention` (its `softmax_offset`) before `linear_proj` (Attention builds it first),
  `q_layernorm` then `k_layernorm` after `linear_qkv` (SelfAttention builds them after it).

A key placed by none of these has no derivable position (`position` gives None): the optimizer code refuses
its state rather than guess (`require`). A torch_dist `.metadata` lists keys in the order the ranks' write
plans were merged (megatron-core's fully parallel save spreads them over the DP ranks), and a legacy file
lists them in whatever order its writer used: both are checked against this order, never used for it.
"""
from __future__ import annotations

from ckptctl.errors import BadInput

EXTRA = "_extra_state"
# TE fused-norm parameter -> its offset before the linear's weight (norm weight, then norm bias)
_TE_NORM = {"layer_norm_weight": -0.5, "layer_norm_bias": -0.25}
# optional submodule -> (sibling it is built next to, offset from that sibling's first (<0) / last (>0) key)
_SIBLING = {"core_attention": ("linear_proj", -0.6), "q_layernorm": ("linear_qkv", 0.2),
            "k_layernorm": ("linear_qkv", 0.5)}


class ModelOrder:
    """Positions of a family's keys in megatron-core's module (named_parameters) order for `cfg`."""

    def __init__(self, family, cfg):
        try:
            keys = [k for k, _ in family.global_keys(cfg)]
        except (NotImplementedError, KeyError, TypeError, ValueError):
            keys = []       # no rules for a fresh model: nothing is placed, optimizer state is refused
        self.index = {k: float(i) for i, k in enumerate(keys)}
        self.first: dict[str, float] = {}       # module -> position of its first key
        self.last: dict[str, float] = {}        # module -> position of its last key
        for k, i in self.index.items():
            parts = k.split(".")
            for n in range(1, len(parts)):
                m = ".".join(parts[:n])
                if i < self.first.get(m, float("inf")):
                    self.first[m] = i
                self.last[m] = max(self.last.get(m, i), i)

    def position(self, gkey: str) -> float | None:
        """The key's position in the model's parameter order, or None when the rules cannot place it."""
        got = self.index.get(gkey)
        if got is not None:
            return got
        module, _, name = gkey.rpartition(".")
        if name in _TE_NORM:
            w = self.index.get(f"{module}.weight")
            return None if w is None else w + _TE_NORM[name]
        first = self.first.get(module)
        if first is not None:
            return first - 0.75
        parent, _, child = module.rpartition(".")
        if child in _SIBLING:
            sib, off = _SIBLING[child]
            anchor = (self.first if off < 0 else self.last).get(f"{parent}.{sib}")
            if anchor is not None:
                return anchor + off + (0.1 if name == "bias" else 0.0)
        return None

    def require(self, gkeys, where: str) -> None:
        """Every parameter with optimizer state must have a position derived from the model."""
        for k in gkeys:
            if self.position(k) is None:
                raise BadInput(f"{where}: cannot derive megatron-core's position of parameter {k!r} from the "
                               "model rules; its optimizer state cannot be placed (convert with --no-optimizer)")

    def check_sequence(self, gkeys: list[str], where: str) -> None:
        """The parameters of one model chunk, in the order a file lists them, must be in the model's order:
        otherwise whatever wrote the file did not follow the model, and state indexed by that order is not
        trustworthy. The error names the first parameter out of place."""
        self.require(gkeys, where)
        prev = None
        for k in gkeys:
            pos = self.position(k)
            if prev is not None and pos < prev[1]:
                raise BadInput(f"{where}: parameter {k!r} comes after {prev[0]!r} in the file, but megatron-core's "
                               "module order puts it before: the file's parameter order is not the model's, so its "
                               "optimizer state cannot be attributed")
            prev = (k, pos)


def sort_position(order: ModelOrder, gkey: str, fallback: int, bound: int) -> float:
    """The plan's ordering position of a key: its model position; keys the rules cannot place (objects
    only matter for the written dict order; parameters with optimizer state are refused by `require`)
    after every placed key, in the order given by `fallback`."""
    pos = order.position(gkey)
    return pos if pos is not None else float(bound + fallback)
