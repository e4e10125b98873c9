"""`inspect` of a legacy checkpoint without torch (issue 13 item 5): the same `Source` as `inspect.inspect`,
with rank files read by `ckptctl.storage.lite_pickle` (tensors as dtype and shape only).

What inspect reports must not depend on the reader: every check below is the torch path's (`files`,
`optim_codec.detect`), and anything the lite reader cannot read raises NotLite, on which the caller runs
the torch path. What inspect does not report is skipped: whether several sub-optimizers could be merged
(`merge`, a convert-time refusal) needs the grad scalers' tensor bytes. The `Source` is for the report only.
"""
from __future__ import annotations

from pathlib import Path

from ckptctl.formats.base import Source
from ckptctl.formats.legacy.files import chunk_names, inventories_from_json, is_legacy, open_legacy, top_level_keys
from ckptctl.models import detect_family, get_family
from ckptctl.models.config import ModelConfig, config_from_args
from ckptctl.optstate.state import inspect_info
from ckptctl.reshard.plan import plan_source
from ckptctl.storage.lite_pickle import NotLite, TensorStub, load

detect = is_legacy
DIST_FILE = "distrib_optim.pt"     # as optim_codec.DIST_FILE (that module imports torch)


def _load(path: Path) -> dict:
    if not Path(path).is_file():
        raise NotLite(f"missing {path}")      # torch path: its error names the file
    sd = load(path)
    if not isinstance(sd, dict):
        raise NotLite(f"{path}: not a dict")
    return sd


def inventory(sd: dict, path: Path) -> dict[str, list]:
    """As `files.inventory`: per chunk (key, shape, dtype) of tensors, (key, None, None) of extra state."""
    out = {}
    for chunk in chunk_names(sd, path):
        entries = []
        for k, v in sd[chunk].items():
            if isinstance(v, TensorStub):
                entries.append((k, v.shape, v.dtype.name))
            elif k.endswith("_extra_state"):
                entries.append((k, None, None))
            else:
                raise NotLite(f"{path}: {chunk}[{k!r}] is a {type(v).__name__}")
        out[chunk] = entries
    return out


def optim_variant(sd: dict, model_path: Path) -> dict | None:
    """As `optim_codec.detect`, without `merge`: any refusal of it is left to the torch path."""
    d = Path(model_path).parent
    if any(d.glob("layer_wise_optimizer_*.pt")) or (d / "optim.pt").exists() or (d / "model_rng.pt").exists():
        raise NotLite(f"{d}: an optimizer layout the torch path refuses")
    if "optimizer" not in sd:
        return None
    opt = sd["optimizer"]
    first = next((o for o in opt if o is not None), None) if isinstance(opt, list) else opt
    n = len(opt) if isinstance(opt, list) else 1
    if not isinstance(first, dict) or "param_state" in first or "param_state_sharding_type" in first:
        raise NotLite(f"{model_path}: an optimizer entry the torch path refuses")
    if "state" in first and "param_groups" in first:
        return {"kind": "adam", "variant": "fp32", "subs": n}
    inner = first.get("optimizer")
    if not isinstance(inner, dict) or "param_groups" not in inner:
        raise NotLite(f"{model_path}: unrecognised optimizer entry")
    if "state" in inner:
        if "fp32_from_fp16_params" not in first:
            raise NotLite(f"{model_path}: mixed precision without masters")
        return {"kind": "adam", "variant": "float16", "subs": n}
    if not (d / DIST_FILE).is_file():
        raise NotLite(f"missing {d / DIST_FILE}")
    return {"kind": "distributed", "variant": "distributed", "subs": n}


def optim_form(info: dict, sharding=None) -> str:
    """As `optim_sides.form_text` (a module that imports torch)."""
    return ("distributed optimizer (distrib_optim.pt flat buffers + param groups)" if info["kind"] == "distributed"
            else f"Adam state dict ({'fp32' if info['variant'] == 'fp32' else 'mixed precision, fp32 masters'})")


def inspect(src: Path, true_vocab: int | None = None, family: str | None = None) -> Source:
    """As `inspect.inspect`, torch-free; NotLite where the torch path must decide."""
    ck = open_legacy(Path(src), load=_load)
    invs, policies, keys, detected = [], {}, [], []
    for fc, path in ck.file_list:
        sd = _load(path)
        detected.append(optim_variant(sd, path))
        chunks = inventory(sd, path)
        if len(chunks) != ck.layout.vpp:
            raise NotLite(f"{path}: chunk count")
        policies.update(top_level_keys(sd, path))
        invs.append({"coord": fc.to_json(), "dirname": path.parent.name, "path": str(path), "chunks": chunks})
        keys += [k for c in chunks.values() for k, _, _ in c]
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
