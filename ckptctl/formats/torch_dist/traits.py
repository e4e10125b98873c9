"""How megatron-core's sharded state dict of each model family differs from its legacy files (the families
themselves know no file format). Looked up by the family's name, then its base families' names: a family
derived from GPT saves as GPTModel does unless an entry says otherwise."""
from __future__ import annotations

import ast


def _moe_stacked(cfg) -> bool:
    # TransformerBlock.sharded_state_dict: moe_layer_freq > 1 or a list makes the layers non-homogeneous
    freq = cfg.extra.get("moe_layer_freq", 1)
    if isinstance(freq, str):
        freq = ast.literal_eval(freq.strip())
    return isinstance(freq, int) and freq <= 1


# whether a block's layers are stacked on a leading axis (`decoder.layers.<rest>`, TransformerBlock of like
# layers) rather than kept as numbered keys (`decoder.layers.<i>.<rest>`)
_STACKED = {"mamba": lambda cfg: False,          # HybridStack: numbered keys
            "moe": _moe_stacked,
            "base": lambda cfg: True}
# keys the legacy files have and the sharded state dict leaves out
_ABSENT = {"gpt": ("output_layer._extra_state",),  # GPTModel.sharded_state_dict pops it (must be empty)
           "bert": (), "t5": (),
           "mamba": (),                            # HybridModel keeps output_layer._extra_state
           "base": ()}
# whether `tied_copies` are saved under their own keys (aliased modules, T5) rather than as replicas of the
# original's key (GPT's tied output layer)
_SAVES_COPIES = {"t5": True, "base": False}


def _lookup(table: dict, family):
    for cls in type(family).__mro__:
        name = cls.__dict__.get("name")
        if name in table:
            return table[name]
    raise KeyError(f"no torch_dist trait for family {family.name!r}")


def stacked(family, cfg) -> bool:
    return _lookup(_STACKED, family)(cfg)


def absent(family) -> tuple[str, ...]:
    return _lookup(_ABSENT, family)


def saves_copies(family) -> bool:
    return _lookup(_SAVES_COPIES, family)
