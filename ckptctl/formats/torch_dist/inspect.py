"""Inspecting a torch_dist checkpoint (CLI process): metadata, common state, the source plan, the optimizer
variant. No tensor bytes are read."""
from __future__ import annotations

from pathlib import Path

from ckptctl.errors import BadInput
from ckptctl.formats.base import Source
from ckptctl.formats.megatron import TOP_LEVEL_POLICY
from ckptctl.formats.torch_dist.metadata import BACKEND, RNG_KEY, open_dist
from ckptctl.formats.torch_dist.names import spec_of, store_key
from ckptctl.formats.torch_dist.optim_info import inspect_info as optim_inspect_info
from ckptctl.formats.torch_dist.source import dropped_keys, plan_source
from ckptctl.models import detect_family, get_family
from ckptctl.models.config import ModelConfig, config_from_args
from ckptctl.reshard.plan import MODEL

# Common-state keys besides the legacy top-level ones: recreated by the writer for the target.
DIST_COMMON_POLICY = {"content_metadata": "format"}


def inspect(src: Path, true_vocab: int | None = None, family: str | None = None):
    """CLI process: a torch_dist checkpoint: metadata, common state and the source plan."""
    ck = open_dist(src)
    return source_of(ck, true_vocab, family, optim_inspect_info,
                     lambda k: BadInput(f"{ck.iter_dir}: unknown common-state key {k!r} (no policy carries it)"))


def source_of(ck, true_vocab, family, info_of, unknown):
    """The Source of an opened checkpoint (torch or torch-free reader: `info_of` reads the optimizer's
    description, `unknown(key)` is the error for a common-state key no policy carries)."""
    spec = spec_of(ck.args)
    keys = [store_key(f, 0, spec) for f in ck.index["tensors"]]
    fam_name = family or detect_family(keys, ck.args)
    fam = get_family(fam_name)
    cfg = config_from_args(ck.args, fam_name, true_vocab)
    fam.validate(cfg, ck.layout)
    plan = plan_source(fam, cfg, ck.layout, ck.index, spec)
    if cfg.padded_vocab is None:
        emb = plan.arrays.get(MODEL + "embedding.word_embeddings.weight")
        if emb:
            cfg = ModelConfig(**{**cfg.__dict__, "padded_vocab": emb["shape"][0]})
    policies = {}
    for k in ck.common:
        pol = TOP_LEVEL_POLICY.get(k) or DIST_COMMON_POLICY.get(k)
        if pol is None:
            raise unknown(k)
        policies[k] = pol
    if any(n.startswith(RNG_KEY + "/") for n in ck.index["objects"]):
        policies[RNG_KEY] = "rng"
    for k in dropped_keys(ck.index):
        policies[k] = "optimizer" if k == "optimizer" else "dropped"
    dist = {"iter_dir": str(ck.iter_dir), "spec": spec, "index": ck.index}
    return Source(ck, fam_name, cfg, [], plan, policies, fmt=BACKEND, dist=dist, optim=info_of(ck, cfg, ck.layout))

