"""`inspect` of a torch_dist checkpoint without torch (issue 13 item 5): the same `Source` as `inspect.inspect`,
with `.metadata` read by an unpickler that admits the DCP classes `metadata` admits (as field records, torch
dtypes as `lite_pickle.DType`) and the common state by `ckptctl.storage.lite_pickle`. The planner, names,
policies and optimizer variant are the torch path's own functions.

Anything the lite readers cannot read raises NotLite and the caller runs the torch path. So does state
with several sub-optimizers (`chained_*` keys, an int-keyed common `optimizer`): whether they could be
merged (`merge`, a convert-time refusal) needs tensor bytes. The `Source` is for the report only.
"""
from __future__ import annotations

import json
import pickle
from pathlib import Path

from ckptctl.formats.base import Source
from ckptctl.formats.megatron import TOP_LEVEL_POLICY, args_dict, layout_from_args
from ckptctl.formats.torch_dist.inspect import DIST_COMMON_POLICY
from ckptctl.formats.torch_dist.metadata import (_ALLOWED, _DCP, _MCORE_STAND_INS, BACKEND, COMMON_KEY, COMMON_PT,
                                                 CONFIG, METADATA, RNG_KEY, DistCheckpoint, _iter_dir, _record,
                                                 check_files, index_of, is_torch_dist, read_blob)
from ckptctl.formats.torch_dist.metadata import _Record as _TorchRecord
from ckptctl.formats.torch_dist.names import spec_of, store_key
from ckptctl.formats.torch_dist.optim_info import form_text, inspect_info, int_keyed
from ckptctl.formats.torch_dist.source import dropped_keys, plan_source
from ckptctl.models import detect_family, get_family
from ckptctl.models.config import ModelConfig, config_from_args
from ckptctl.reshard.plan import MODEL
from ckptctl.storage.lite_pickle import _DTYPES, DType, NotLite, load

detect = is_torch_dist
optim_form = form_text


class _Record(_TorchRecord):
    """As `metadata._Record`, with a pickled dtype as a `lite_pickle.DType`."""

    @staticmethod
    def _dtype_class() -> type:
        return DType


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module, name):
        if module == "__builtin__":
            module = "builtins"
        if (module, name) in _ALLOWED or (module, name) in _MCORE_STAND_INS:
            if module.startswith(_DCP) or module.startswith("megatron."):
                return _record(name, _Record)
            if (module, name) == ("torch", "Size"):
                return tuple
            if (module, name) == ("torch.serialization", "_get_layout"):
                return lambda layout: layout          # a layout by name: inspect never reads it
            return super().find_class(module, name)   # collections.OrderedDict, builtins.set / frozenset
        if module == "torch" and name in _DTYPES:
            return DType(name)
        raise NotLite(f"metadata global {module}.{name}")


def _load_metadata(path: Path):
    try:
        with open(path, "rb") as f:
            md = _MetadataUnpickler(f).load()
    except NotLite:
        raise
    except Exception as e:  # noqa: BLE001 - missing or corrupt: the torch path names it
        raise NotLite(f"{path}: {e}") from None
    if not hasattr(md, "state_dict_metadata") or not hasattr(md, "storage_data"):
        raise NotLite(f"{path}: not a DCP Metadata object")
    return md


def open_dist(root: Path) -> DistCheckpoint:
    """As `metadata.open_dist`, through the lite readers."""
    found = _iter_dir(Path(root))
    if found is None:
        raise NotLite(f"{root}: no {CONFIG}")
    iteration, it_dir = found
    if json.loads((it_dir / CONFIG).read_text()).get("sharded_backend") != BACKEND:
        raise NotLite("sharded_backend")
    index = index_of(_load_metadata(it_dir / METADATA), it_dir / METADATA)
    check_files(it_dir, index)
    if (it_dir / COMMON_PT).is_file():
        common = load(it_dir / COMMON_PT)
    else:
        ref = index["objects"].get(f"{COMMON_KEY}/shard_0_1")
        if ref is None:
            raise NotLite("no common state")
        data = load(it_dir / ref[0], read_blob(it_dir, ref))
        if not isinstance(data, list) or len(data) != 1:
            raise NotLite("common state is not a one-element list")
        common = data[0]
    if not isinstance(common, dict) or "args" not in common:
        raise NotLite("common state without args")
    args = args_dict(common["args"])
    return DistCheckpoint(Path(root), iteration, it_dir, layout_from_args(args), args, common, index)


def inspect(src: Path, true_vocab: int | None = None, family: str | None = None) -> Source:
    """As `inspect.inspect`, torch-free; NotLite where the torch path must decide."""
    ck = open_dist(Path(src))
    if any(n.startswith("chained_") for n in ck.index["order"]) or int_keyed(ck.common.get("optimizer")):
        raise NotLite("several sub-optimizers")
    from ckptctl.formats.torch_dist.inspect import source_of   # the one Source builder, torch-free at import
    return source_of(ck, true_vocab, family, inspect_info, lambda k: NotLite(f"unknown common-state key {k!r}"))
