"""Hugging Face -> Megatron: an HF folder becomes Megatron's global tensors (the name map run backwards,
`view(...).copy_`), written at a target layout through the same planner and file writer as every
other target, as a `release` checkpoint with weights only (Megatron-LM then loads no optimizer or RNG
state, as for its own converted checkpoints).

Every HF tensor must be used exactly once and every element of every Megatron tensor set, except the
vocab padding rows (zero, as megatron-core initialises them); otherwise nothing is written.
"""
from __future__ import annotations

import argparse
import shutil
import uuid
from math import prod
from pathlib import Path

import torch

from ckptctl.errors import BadInput
from ckptctl.formats.hf import arch as archmod
from ckptctl.formats.hf.files import HFFolder
from ckptctl.formats.hf.names import check_covered, entries, hf_shape, view
from ckptctl.layout import FileCoord, Layout
from ckptctl.models import get_family
from ckptctl.models.config import ModelConfig, padded_vocab

ST_DTYPES = {"F32": "float32", "BF16": "bfloat16", "F16": "float16"}
# tensors some HF checkpoints carry that are recomputed, not weights
IGNORED = (".rotary_emb.inv_freq",)


def read_model(path: Path, expert_kind: str = "sequential"):
    """(family name, Family, ModelConfig at TP1, Megatron args fields, dtype, global arrays) of an HF folder."""
    folder = HFFolder(path)
    family, arch, cfg, args = archmod.from_hf_config(folder.config, str(Path(path) / "config.json"))
    if expert_kind not in ("sequential", "grouped"):
        raise BadInput(f"--expert-kind: expected sequential or grouped, got {expert_kind!r}")
    if cfg.num_experts:
        cfg = ModelConfig(**{**cfg.__dict__, "extra": {**cfg.extra, "moe_grouped_gemm": expert_kind == "grouped"}})
    dtypes = {folder._meta[k][0] for k in folder.keys() if not k.endswith(IGNORED)}
    if len(dtypes) != 1 or next(iter(dtypes)) not in ST_DTYPES:
        raise BadInput(f"{path}: tensor dtypes {sorted(dtypes)}: expected one of {', '.join(ST_DTYPES)} throughout")
    dtype = ST_DTYPES[dtypes.pop()]
    cfg = ModelConfig(**{**cfg.__dict__, "padded_vocab": padded_vocab(cfg.true_vocab, cfg.vocab_divisor, 1)})
    fam = get_family(family)
    from ckptctl.reshard.plan import Inventory, plan_source
    keys = fam.global_keys(cfg)
    inv = Inventory(FileCoord(0, 0), "global", {"model": [(k, s, None if s is None else dtype) for k, s in keys]})
    src = plan_source(fam, cfg, Layout(ep=1), [inv])
    arrays = {n: torch.zeros(s["shape"], dtype=getattr(torch, s["dtype"])) for n, s in src.arrays.items()}
    ents = entries(arch, cfg, src.arrays, cfg.true_vocab)
    check_covered(ents, src.arrays, arch)
    _fill(folder, ents, arrays, cfg, path)
    return family, fam, cfg, args, dtype, arrays, src


def _fill(folder: HFFolder, ents, arrays: dict, cfg: ModelConfig, path) -> None:
    want = {e.hf for e in ents}
    extra = [k for k in folder.keys() if k not in want and not k.endswith(IGNORED)]
    if cfg.tied and extra == ["lm_head.weight"]:
        # a tied model saved with its head: accepted only as a byte copy of the embedding
        if not torch.equal(folder.get("lm_head.weight").view(torch.uint8), folder.get("model.embed_tokens.weight").view(torch.uint8)):
            raise BadInput(f"{path}: tie_word_embeddings is true but lm_head.weight differs from the embedding")
        extra = []
    if extra:
        raise BadInput(f"{path}: tensor {extra[0]!r} has no Megatron counterpart in this mapping")
    covered = {n: 0 for n in arrays}
    for e in ents:
        if e.hf not in folder.weight_map:
            raise BadInput(f"{path}: tensor {e.hf!r} is missing")
        dst = view(arrays[e.array], e.steps, cfg)
        t = folder.get(e.hf)
        if tuple(t.shape) != hf_shape(tuple(arrays[e.array].shape), e.steps, cfg) or t.dtype != dst.dtype:
            raise BadInput(f"{path}: tensor {e.hf} is {t.dtype} {tuple(t.shape)}, the config implies "
                           f"{dst.dtype} {hf_shape(tuple(arrays[e.array].shape), e.steps, cfg)}")
        dst.copy_(t.reshape(dst.shape))
        covered[e.array] += t.numel()
    for n, a in arrays.items():
        rows = a.shape[0] - cfg.true_vocab if n.endswith(("word_embeddings.weight", "output_layer.weight")) else 0
        need = a.numel() - rows * prod(a.shape[1:])
        if covered[n] != need:   # an entry set written twice or a gap: a mapping error, never silently zeros
            raise BadInput(f"{path}: {n[6:]} got {covered[n]} of {need} elements from the HF tensors")


def megatron_args(cfg: ModelConfig, layout: Layout, dtype: str, extra_args: dict, family) -> argparse.Namespace:
    """Megatron-LM args fields of the imported model (names as arguments.py; what --use-checkpoint-args reads)."""
    from ckptctl.example import make_args
    seq = int(cfg.extra.get("max_position_embeddings", 4096))
    a = make_args(cfg, layout, dtype, seq, bool(cfg.extra.get("add_bias_linear")))
    vars(a).update(extra_args)
    vars(a).update(add_position_embedding=False, use_rotary_position_embeddings=True, apply_layernorm_1p=False,
                   tokenizer_type="HuggingFaceTokenizer", apply_query_key_layer_scaling=False,
                   use_checkpoint_args=False, ckpt_format="torch", iteration=0, transformer_impl="local")
    return argparse.Namespace(**family.layout_args(vars(a), cfg, layout))


def import_hf(src: Path, dst: Path, layout: Layout, *, to_format: str = "legacy", expert_kind: str = "sequential",
              overwrite: bool = False, nproc: int | None = None) -> dict:
    """Write the Megatron checkpoint `dst` (legacy `torch`, or torch_dist through convert) at `layout`."""
    src, dst = Path(src), Path(dst)
    if (dst.is_dir() and any(dst.iterdir()) or dst.is_file()) and not overwrite:
        raise BadInput(f"destination {dst} exists and is not empty (use --overwrite)")
    if to_format not in ("legacy", "torch", "torch_dist"):
        raise BadInput(f"--to-format: an HF source converts to legacy or torch_dist, not {to_format!r}")
    family, fam, base, extra_args, dtype, arrays, src_plan = read_model(src, expert_kind)
    cfg = ModelConfig(**{**base.__dict__, "padded_vocab": base.vocab_for_tp(layout.tp)})
    fam.validate(cfg, layout)
    tmp = dst.with_name(f".{dst.name}.ckptctl-hf-{uuid.uuid4().hex[:8]}")
    try:
        nfiles = _write_legacy(fam, cfg, layout, dtype, extra_args, arrays, src_plan, tmp / "legacy"
                               if to_format == "torch_dist" else tmp)
        if to_format == "torch_dist":
            from ckptctl.convert import convert
            convert(tmp / "legacy", tmp / "dist", layout, to_format="torch_dist", nproc=nproc, optimizer=False)
            shutil.rmtree(tmp / "legacy")
            (tmp / "dist").rename(tmp / "x")
            for p in (tmp / "x").iterdir():
                p.rename(tmp / p.name)
            (tmp / "x").rmdir()
        if dst.exists():
            shutil.rmtree(dst) if dst.is_dir() else dst.unlink()
        tmp.rename(dst)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return {"family": family, "layout": str(layout), "out": str(dst), "format": to_format, "files": nfiles,
            "dtype": dtype, "padded_vocab": cfg.padded_vocab, "vocab": cfg.true_vocab,
            "bytes": sum(a.numel() * a.element_size() for a in arrays.values())}


def _write_legacy(fam, cfg, layout, dtype, extra_args, arrays, src_plan, out: Path) -> int:
    from ckptctl.example import MemoryStore
    from ckptctl.formats import legacy
    from ckptctl.reshard.plan import plan_target
    from ckptctl.reshard.run import Progress, build_file
    files = plan_target(fam, cfg, layout, src_plan.manifest, src_plan.arrays, set())
    common = {"args": megatron_args(cfg, layout, dtype, extra_args, fam), "checkpoint_version": 3.0,
              "iteration": 0}
    store = MemoryStore(arrays)
    it_dir = out / legacy.iter_dirname("release")
    for fp in files:
        sd = build_file(store, fp, common, {}, Progress(None, 0))
        (it_dir / fp.dirname).mkdir(parents=True)
        legacy.save_pt(sd, it_dir / fp.dirname / legacy.MODEL_FILE)
    legacy.write_tracker(out, "release")
    return len(files)
