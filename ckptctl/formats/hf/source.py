"""A Hugging Face folder as a source: it reads like a TP1PP1 Megatron checkpoint of one unit.

`inspect` maps config.json to Megatron's config (`arch.from_hf_config`) and lists the Megatron tensors a
freshly built megatron-core model has (`Family.global_keys`: local-spec names, megatron-core's order);
the unit assembles each of them from the HF tensors through the name map run backwards
(`view(global).copy_(hf)`), so the generic source phase, store and target writers (legacy, torch_dist,
any layout, verify's gather) work unchanged. The vocabulary is the true one (no padding rows in HF):
targets pad it for their TP with zero rows, and verify treats rows past it as padding.

Every HF tensor must be used and every Megatron element set exactly once (checked from the safetensors
headers in `inspect`, before any output).
"""
from __future__ import annotations

import argparse
from dataclasses import dataclass
from math import prod
from pathlib import Path

import torch

from ckptctl.errors import BadInput
from ckptctl.formats.base import Source
from ckptctl.formats.hf import arch as archmod
from ckptctl.formats.hf.files import HFFolder
from ckptctl.formats.hf.names import check_covered, entries, hf_shape, view
from ckptctl.layout import FileCoord, Layout
from ckptctl.models import get_family
from ckptctl.models.config import ModelConfig

ST_DTYPES = {"F32": "float32", "BF16": "bfloat16", "F16": "float16"}
IGNORED = (".rotary_emb.inv_freq",)    # recomputed buffers some older HF checkpoints carry
UNIT = "hf"                            # the one unit's name (as a rank file's directory name)


@dataclass
class HFCheckpoint:
    """What generic code asks of `Source.ckpt`."""
    root: Path
    layout: Layout
    args: dict
    iteration: str = "release"        # weights only: Megatron-LM loads a release checkpoint without optimizer/RNG

    @property
    def iter_dir(self) -> Path:
        return self.root


def model_of(path: Path, expert_kind: str = "sequential"):
    """(folder, family, arch, ModelConfig with the true vocab unpadded, Megatron args dict, dtype)."""
    folder = HFFolder(path)
    family, arch, cfg, args = archmod.from_hf_config(folder.config, str(Path(path) / "config.json"))
    if expert_kind not in ("sequential", "grouped"):
        raise BadInput(f"expert kind: expected sequential or grouped, got {expert_kind!r}")
    extra = dict(cfg.extra)
    if cfg.num_experts:
        extra["moe_grouped_gemm"] = expert_kind == "grouped"
    cfg = ModelConfig(**{**cfg.__dict__, "padded_vocab": cfg.true_vocab, "extra": extra})
    dtypes = {folder._meta[k][0] for k in folder.keys() if not k.endswith(IGNORED)}
    if len(dtypes) != 1 or next(iter(dtypes)) not in ST_DTYPES:
        raise BadInput(f"{path}: tensor dtypes {sorted(dtypes)}: expected one of {', '.join(ST_DTYPES)} throughout")
    return folder, family, arch, cfg, args, ST_DTYPES[dtypes.pop()]


def megatron_args(cfg: ModelConfig, dtype: str, extra_args: dict) -> dict:
    """The Megatron-LM args of the model at TP1PP1 (target writers rewrite the parallel fields): what
    `--use-checkpoint-args` reads, names as arguments.py."""
    from ckptctl.formats.megatron import make_args
    seq = int(cfg.extra.get("max_position_embeddings", 4096))
    plain = ModelConfig(**{**cfg.__dict__, "extra": {k: v for k, v in cfg.extra.items() if k != "swiglu"}})
    a = vars(make_args(plain, Layout(), dtype, seq, bool(cfg.extra.get("add_bias_linear"))))   # sets swiglu itself
    a.update(extra_args)
    a.update(add_position_embedding=False, use_rotary_position_embeddings=True, apply_layernorm_1p=False,
             tokenizer_type="HuggingFaceTokenizer", apply_query_key_layer_scaling=False, transformer_impl="local",
             iteration=0)
    return a


def _plan(family: str, cfg: ModelConfig, dtype: str):
    from ckptctl.reshard.plan import Inventory, plan_source
    fam = get_family(family)
    keys = fam.global_keys(cfg)
    chunks = {"model": [(k, s, None if s is None else dtype) for k, s in keys]}
    return plan_source(fam, cfg, Layout(), [Inventory(FileCoord(0, 0), UNIT, chunks)]), chunks


def inspect(path: Path, true_vocab: int | None = None, family: str | None = None,
            expert_kind: str = "sequential") -> Source:
    path = Path(path)
    folder, fam_name, arch, cfg, extra_args, dtype = model_of(path, expert_kind)
    if family is not None and family != fam_name:
        raise BadInput(f"{path}: a {arch.model_type} model is family {fam_name}, not {family}")
    if true_vocab is not None and true_vocab != cfg.true_vocab:
        raise BadInput(f"--true-vocab-size {true_vocab}: {path}/config.json says vocab_size {cfg.true_vocab}")
    plan, chunks = _plan(fam_name, cfg, dtype)
    ents = entries(arch, cfg, plan.arrays, cfg.true_vocab)
    check_covered(ents, plan.arrays, arch)
    _check_tensors(folder, ents, plan.arrays, cfg, dtype, path)
    args = megatron_args(cfg, dtype, extra_args)
    inv = {"coord": FileCoord(0, 0).to_json(), "dirname": UNIT, "path": str(path),
           "chunks": {c: [[k, list(s) if s is not None else None, d] for k, s, d in e] for c, e in chunks.items()}}
    ckpt = HFCheckpoint(path, Layout(), args)
    return Source(ckpt, fam_name, cfg, [inv], plan, {}, fmt="hf",
                  dist={"root": str(path), "expert_kind": expert_kind, "dtype": dtype}, optim=None)


def _check_tensors(folder: HFFolder, ents, arrays: dict, cfg: ModelConfig, dtype: str, path: Path) -> None:
    """From the safetensors headers: every HF tensor used, of the implied shape, every element set once."""
    want = {e.hf for e in ents}
    extra = [k for k in folder.keys() if k not in want and not k.endswith(IGNORED)]
    if cfg.tied and "lm_head.weight" in extra:
        extra.remove("lm_head.weight")   # a tied model saved with its head: checked equal to the embedding on read
    if extra:
        raise BadInput(f"{path}: tensor {extra[0]!r} has no Megatron counterpart in the {folder.config['model_type']} "
                       "mapping")
    covered = {n: 0 for n in arrays}
    for e in ents:
        if e.hf not in folder.weight_map:
            raise BadInput(f"{path}: tensor {e.hf!r} is missing")
        shape = hf_shape(tuple(arrays[e.array]["shape"]), e.steps, cfg)
        if folder.shape(e.hf) != shape:
            raise BadInput(f"{path}: tensor {e.hf} has shape {folder.shape(e.hf)}, config.json implies {shape}")
        covered[e.array] += prod(shape)
    for n, spec in arrays.items():
        if spec["shape"] is not None and covered[n] != prod(spec["shape"]):
            raise BadInput(f"{path}: {n[6:]} would get {covered[n]} of {prod(spec['shape'])} elements from the HF "
                           "tensors")


class HFUnit:
    """The HF folder opened by a source worker (or verify's gather): Megatron tensors on request."""

    def __init__(self, dist: dict):
        root = Path(dist["root"])
        self.folder, fam, arch, self.cfg, extra_args, dtype = model_of(root, dist.get("expert_kind", "sequential"))
        plan, _ = _plan(fam, self.cfg, dtype)
        self.arrays = plan.arrays
        self.by_array: dict[str, list] = {}
        for e in entries(arch, self.cfg, plan.arrays, self.cfg.true_vocab):
            self.by_array.setdefault(e.array, []).append(e)
        self.args, self._cache = megatron_args(self.cfg, dtype, extra_args), {}
        self.fresh = dist.get("fresh")          # --fresh-optimizer: its info (ckptctl.formats.hf.fresh)
        if self.fresh:
            from ckptctl.formats.hf.fresh import run_args
            self.args.update(run_args(self.fresh, dtype))

    def _fill(self, out: torch.Tensor, ents, skip: int) -> None:
        for e in ents:
            dst = view(out, e.steps[skip:], self.cfg)
            t = self.folder.get(e.hf)
            if t.dtype != out.dtype:
                raise BadInput(f"{self.folder.path}: tensor {e.hf} is {t.dtype}, the others {out.dtype}")
            dst.copy_(t.reshape(dst.shape))

    def region(self, array: str, gbox) -> torch.Tensor:
        """A box of a Megatron global tensor; stacked experts are assembled one expert at a time."""
        spec = self.arrays[array]
        dtype = getattr(torch, spec["dtype"])
        ents = self.by_array[array]
        if all(e.steps and e.steps[0][0] == "expert" for e in ents):
            parts = []
            for k in range(gbox.offsets[0], gbox.offsets[0] + gbox.sizes[0]):
                one = torch.empty(tuple(spec["shape"][1:]), dtype=dtype)
                self._fill(one, [e for e in ents if e.steps[0][1] == k], 1)
                parts.append(one[gbox.slices[1:]])
            return torch.stack(parts)
        if array not in self._cache:     # q/k/v, gate/up of one array: read once
            self._cache.clear()
            full = torch.empty(tuple(spec["shape"]), dtype=dtype)
            self._fill(full, ents, 0)
            self._cache[array] = full
        return self._cache[array][gbox.slices]

    # --- the unit interface (ckptctl.formats.base.Format.unit_opener) ---
    def tensor(self, t) -> torch.Tensor:
        out = torch.empty(tuple(t.shape), dtype=getattr(torch, t.dtype))
        for p in t.pieces:
            out[p.local.slices] = self.region(p.array, p.gbox).reshape(p.local.sizes)
        if t.key == "embedding.word_embeddings.weight" and self.cfg.tied and "lm_head.weight" in self.folder.weight_map:
            head = self.folder.get("lm_head.weight")
            if not torch.equal(head.view(torch.uint8), out.view(torch.uint8)):
                raise BadInput(f"{self.folder.path}: tie_word_embeddings is true but lm_head.weight differs from "
                               "model.embed_tokens.weight")
        return out

    def object(self, o):
        return None            # megatron-core's local-spec linears save _extra_state as None

    def rng(self) -> dict:
        return {}

    def common(self) -> dict:
        out = {"args": argparse.Namespace(**self.args), "checkpoint_version": 3.0, "iteration": 0}
        if self.fresh:     # a non-release checkpoint: Megatron-LM loads its scheduler with the optimizer
            from ckptctl.formats.hf.fresh import scheduler_state
            out.update(opt_param_scheduler=scheduler_state(self.fresh), num_floating_point_operations_so_far=0)
        return out

    def dropped(self) -> list[str]:
        return []
