"""The store's pickled objects (extra state, args, RNG, the common and optimizer state): `torch.save` bytes as
1-D uint8 arrays with a crc32c, read back through the safe unpickler; and how a target phase opens a
complete store and picks the RNG state of each target file."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ckptctl.errors import BadInput
from ckptctl.layout import Layout
from ckptctl.models import get_family
from ckptctl.models.config import ModelConfig
from ckptctl.reshard.plan import OBJECTS, FilePlan
from ckptctl.storage.pickles import dumps_bytes, loads_bytes
from ckptctl.store import Crc32cCodec, Store

COMMON = "common"
OPTIM_COMMON = "optimizer@common"


def _object_name(slot: str) -> str:
    return OBJECTS + slot.replace("|", "@").replace("/", "_")


def put_object(store: Store, slot: str, value) -> str:
    if value is None:
        return "none"
    data = np.frombuffer(dumps_bytes(value), dtype=np.uint8)
    store.group.create_array(_object_name(slot), shape=data.shape, dtype="uint8", chunks=data.shape or (1,),
                             compressors=Crc32cCodec(), filters=None, fill_value=0, overwrite=True)[...] = data
    return "bytes"


def get_object(store: Store, slot: str, enc: str):
    if enc == "none":
        return None
    from ckptctl.storage import bulk_objects   # objects a source phase wrote in bulk (one row per file)
    if bulk_objects.is_bulk(enc):
        return bulk_objects.get(store, slot, enc)
    return loads_bytes(store.group[_object_name(slot)][...].tobytes(), slot)


def empty_like_encoding(value):
    """The empty value of an _extra_state's encoding: written when a module's shard changed."""
    if value is None:
        return None
    if torch.is_tensor(value):
        return torch.empty(0, dtype=value.dtype)
    import io
    return io.BytesIO()


def rng_for(policy: str, src_layout: Layout, dst_layout: Layout, fp: FilePlan, encs: dict) -> str | None:
    """Which stored RNG state a target file gets (DESIGN §3): carry when TP and PP are unchanged."""
    if policy == "drop":
        return None
    same = src_layout.tp == dst_layout.tp and src_layout.pp == dst_layout.pp
    if policy in ("auto", "carry") and same:
        slot = "rng@" + fp.dirname
        if slot in encs:
            return slot
        if policy == "carry":
            raise BadInput(f"--rng carry: no source RNG state for {fp.dirname}")
    elif policy == "carry":
        raise BadInput("--rng carry needs the same TP and PP on both sides; use replicate or drop")
    first = sorted(k for k in encs if k.startswith("rng@"))
    return first[0] if first else None


def open_target(job):
    """The complete store a target phase reads, and what its attributes say: (store, attrs, family,
    config, source layout, target layout, object encodings)."""
    store = Store.open(Path(job.store))
    attrs = store.attrs
    if not attrs.get("complete"):
        raise BadInput(f"{job.store}: the store is incomplete (its source phase did not finish)")
    return (store, attrs, get_family(attrs["family"]), ModelConfig.from_json(attrs["config"]),
            Layout.from_json(attrs["source_layout"]), Layout.from_json(job.dst_layout), attrs["objects"])
