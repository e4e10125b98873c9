"""The allow-list of globals a Megatron checkpoint may name besides torch's own, and the stand-ins for
Megatron's own classes (enums in args). One list for every reader: torch.load(weights_only=True) in
`pickles`, the C unpickler in `mapped_pickle`, the torch-free reader in `lite_pickle`. Imports nothing
heavy: numpy only when the list is first built."""
from __future__ import annotations

import argparse
import functools
import io


@functools.cache
def safe_globals() -> list:
    """Globals a Megatron checkpoint may name besides torch's own: args is a Namespace; TE extra state may
    be a BytesIO. Megatron's enums in args get a stand-in that writes itself back under the same name.
    Megatron-LM's RNG state holds numpy's RandomState state: an ndarray of uint32. (Built on the first
    load: inspect's torch-free readers import modules that import this one, without numpy.)"""
    import numpy as np
    return [argparse.Namespace, io.BytesIO, np._core.multiarray._reconstruct,
            (np._core.multiarray._reconstruct, "numpy.core.multiarray._reconstruct"), np.ndarray, np.dtype] + \
        [getattr(np.dtypes, n) for n in dir(np.dtypes) if n.endswith("DType")]


FOREIGN_PREFIXES = ("megatron.",)


class ForeignObject:
    """An object of a class we do not import (a Megatron enum in args), kept by name and arguments."""

    qualname = ""

    def __init__(self, *args):
        self.args = args

    def __repr__(self):
        return f"{self.qualname}{self.args!r}"

    def __eq__(self, other):
        return type(other) is type(self) and other.args == self.args

    def __hash__(self):
        return hash((self.qualname, self.args))


_foreign: dict[str, type] = {}


def _stand_in(qualname: str) -> type:
    if qualname not in _foreign:
        _foreign[qualname] = type(qualname.rsplit(".", 1)[1], (ForeignObject,), {"qualname": qualname})
    return _foreign[qualname]
