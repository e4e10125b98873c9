"""Facts about Zarr v3 metadata documents that the store, its references and the bulk objects share."""
from __future__ import annotations

GROUP_META = {"attributes": {}, "zarr_format": 3, "node_type": "group"}   # what zarr writes for a parent group


def ends_in_crc32c(meta: dict) -> bool:
    """Does the array's codec chain end in crc32c after its `bytes` codec (each chunk file then ends in
    its 4-byte checksum)?"""
    return [c.get("name") for c in meta.get("codecs", [])[1:]] == ["crc32c"]
