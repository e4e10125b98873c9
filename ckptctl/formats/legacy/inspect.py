"""Inspecting a legacy checkpoint (CLI process): every rank file's key lists (tensors stay on disk,
memory-mapped), the config, family and source plan, and the optimizer variant. No tensor is copied."""
from __future__ import annotations

from pathlib import Path

from ckptctl.errors import BadInput
from ckptctl.formats.base import Source
from ckptctl.formats.legacy.files import inventories_from_json, inventory, open_legacy, top_level_keys
from ckptctl.formats.legacy.optim_codec import detect
from ckptctl.models import detect_family, get_family
from ckptctl.models.config import ModelConfig, config_from_args
from ckptctl.optstate.state import inspect_info
from ckptctl.reshard.plan import plan_source
from ckptctl.storage.pickles import load_pt


def inspect(src: Path, true_vocab: int | None = None, family: str | None = None) -> Source:
    ck = open_legacy(Path(src))
    invs, policies, keys, detected = [], {}, [], []
    for fc, path in ck.file_list:
        sd = load_pt(path)
        detected.append(detect(sd, path))
        chunks = inventory(sd, path)
        expected = ck.layout.vpp
        if len(chunks) != expected:
            raise BadInput(f"{path}: has {len(chunks)} model chunks, layout {ck.layout} expects {expected}")
        policies.update(top_level_keys(sd, path))
        invs.append({"coord": fc.to_json(), "dirname": path.parent.name, "path": str(path), "chunks": chunks})
        keys += [k for c in chunks.values() for k, _, _ in c]
        del sd
    fam_name = family or detect_family(keys, ck.args)
    fam = get_family(fam_name)
    cfg = config_from_args(ck.args, fam_name, true_vocab)
    fam.validate(cfg, ck.layout)
    plan = plan_source(fam, cfg, ck.layout, inventories_from_json(invs))
    if cfg.padded_vocab is None:
        emb = plan.arrays.get("model/embedding.word_embeddings.weight")
        if emb:
            cfg = ModelConfig(**{**cfg.__dict__, "padded_vocab": emb["shape"][0]})
    info = inspect_info(detected, [p for _, p in ck.file_list], cfg, ck.layout, ck.args)
    return Source(ck, fam_name, cfg, invs, plan, policies, optim=info)
