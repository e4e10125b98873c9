"""Model families: each family's sharding rules live in one module; this picks the family."""
from __future__ import annotations

from ckptctl.errors import BadInput
from ckptctl.models.base import Family
from ckptctl.models.gpt import GPT

_FAMILIES: dict[str, type[Family]] = {"gpt": GPT}


def register(cls: type[Family]) -> type[Family]:
    _FAMILIES[cls.name] = cls
    return cls


def family_names() -> list[str]:
    _load_all()
    return sorted(_FAMILIES)


def get_family(name: str) -> Family:
    _load_all()
    if name not in _FAMILIES:
        raise BadInput(f"unknown model family {name!r}; known: {', '.join(sorted(_FAMILIES))}")
    return _FAMILIES[name]()


def detect_family(keys: list[str], args: dict) -> str:
    """Guess the family from the tensor names (args do not name it)."""
    ks = set(keys)
    if (any(".mixer." in k for k in ks) or args.get("hybrid_override_pattern") or args.get("hybrid_layer_pattern")
            or args.get("is_hybrid_model")):
        return "mamba"
    if any(k.startswith("encoder.layers.") for k in ks) and any(k.startswith("decoder.layers.") for k in ks):
        return "t5"
    if any(k.startswith(("lm_head.", "binary_head.", "encoder.layers.")) for k in ks):
        return "bert"
    if any(".mlp.experts." in k or ".mlp.router." in k for k in ks) or args.get("num_experts"):
        return "moe"
    return "gpt"


def _load_all() -> None:
    # Families register themselves on import; import the optional ones lazily to avoid cycles.
    import importlib
    for mod in ("bert", "t5", "mamba", "moe"):
        try:
            importlib.import_module(f"ckptctl.models.{mod}")
        except ModuleNotFoundError as e:
            if e.name != f"ckptctl.models.{mod}":
                raise
