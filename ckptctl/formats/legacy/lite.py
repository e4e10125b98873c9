"""`inspect` of a legacy checkpoint without torch (issue 13 item 5): the same `Source` as `inspect.inspect`,
with rank files read by `ckptctl.storage.lite_pickle` (tensors as dtype and shape only).

What inspect reports must not depend on the reader: every check is the torch path's own code
(`files.inventory`, `optim_kind.variant`, and `source_of` below, which `inspect.inspect` calls with its torch
readers). Anything the lite reader cannot read raises NotLite, a refusal the torch path's BadInput; on
either the caller runs the torch path, which gives the verdict. What inspect does not report is skipped:
whether several sub-optimizers could be merged (`merge`, a convert-time refusal) needs the grad scalers'
tensor bytes. The `Source` is for the report only.
"""
from __future__ import annotations

from pathlib import Path

from ckptctl.errors import BadInput
from ckptctl.formats.base import Source
from ckptctl.formats.legacy.files import inventories_from_json, inventory, is_legacy, open_legacy, top_level_keys
from ckptctl.formats.legacy.optim_kind import variant
from ckptctl.models import detect_family, get_family
from ckptctl.models.config import ModelConfig, config_from_args
from ckptctl.optstate.state import inspect_info
from ckptctl.reshard.plan import plan_source
from ckptctl.storage.lite_pickle import NotLite, TensorStub, load

detect = is_legacy


def _load(path: Path) -> dict:
    if not Path(path).is_file():
        raise NotLite(f"missing {path}")      # torch path: its error names the file
    sd = load(path)
    if not isinstance(sd, dict):
        raise NotLite(f"{path}: not a dict")
    return sd


def _stub(v) -> tuple | None:
    """(shape, dtype name) of a tensor as the lite reader gives it, None for anything else."""
    return (v.shape, v.dtype.name) if isinstance(v, TensorStub) else None


def optim_form(info: dict, sharding=None) -> str:
    """As `optim_sides.form_text` (a module that imports torch)."""
    return ("distributed optimizer (distrib_optim.pt flat buffers + param groups)" if info["kind"] == "distributed"
            else f"Adam state dict ({'fp32' if info['variant'] == 'fp32' else 'mixed precision, fp32 masters'})")


def inspect(src: Path, true_vocab: int | None = None, family: str | None = None) -> Source:
    """As `inspect.inspect`, torch-free; NotLite (or the torch path's refusal) where the torch path must decide."""
    return source_of(open_legacy(Path(src), load=_load), _load, variant,
                     lambda sd, path: inventory(sd, path, _stub), true_vocab, family)


def source_of(ck, load_file, optim_of, inventory_of, true_vocab: int | None, family: str | None) -> Source:
    """The Source of an opened legacy checkpoint, for the torch path (`inspect.inspect`) and this one: `load_file`
    reads a rank file, `optim_of(sd, path)` and `inventory_of(sd, path)` describe it."""
    invs, policies, keys, detected = [], {}, [], []
    for fc, path in ck.file_list:
        sd = load_file(path)
        detected.append(optim_of(sd, path))
        chunks = inventory_of(sd, path)
        if len(chunks) != ck.layout.vpp:
            raise BadInput(f"{path}: has {len(chunks)} model chunks, layout {ck.layout} expects {ck.layout.vpp}")
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
