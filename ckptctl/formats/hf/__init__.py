"""Hugging Face model folders (config.json + safetensors) as a ckptctl format: exported from and imported
to Megatron checkpoints exactly, or refused naming what cannot map (docs/hf.md).

- `arch`:   which HF architecture a Megatron model is (or the refusal), config.json both ways
- `names`:  the name map, every HF tensor as a view of one Megatron global tensor
- `files`:  sharded safetensors, index and JSON files (the safetensors library writes and reads them)
- `export`: store -> HF folder (the worker side is `target`); `export_checkpoint` for any checkpoint
- `source`: an HF folder read as a TP1PP1 Megatron checkpoint of one unit (import, verify, inspect)
"""
from __future__ import annotations

from pathlib import Path

from ckptctl.errors import BadInput
from ckptctl.formats.base import Format, Source


class HFFormat(Format):
    name = "hf"
    aliases = ("huggingface", "safetensors")
    megatron_name = ""            # not a Megatron-LM --ckpt-format
    detect_order = 10             # config.json + safetensors: unambiguous
    layout_free = True            # a target without a parallel layout (no --to)
    holds_optimizer = False       # weights only: optimizer and RNG state are not exported
    # `ckptctl matrix` rows through Hugging Face (A -> HF -> B), per family
    matrix_pairs = {
        # Llama-style (vocab 128: no trained padding rows)
        "gpt": [("tp2pp2", "tp1pp4", {"via": "hf", "swiglu": True, "groups": 2, "norm": "RMSNorm", "position": "rope",
                                      "bias": False, "optimizer": "none"})],
        # Qwen2-MoE-style (gated shared expert)
        "moe": [("tp1pp1ep4", "tp2pp1ep2", {"via": "hf", "swiglu": True, "norm": "RMSNorm", "position": "rope",
                                            "shared_ffn": 32, "shared_gate": True, "optimizer": "none"})],
    }

    def detect(self, path: Path) -> bool:
        from ckptctl.formats.hf.files import is_hf
        return is_hf(path)

    def inspect(self, path, true_vocab=None, family=None) -> Source:
        from ckptctl.formats.hf.source import inspect
        return inspect(Path(path), true_vocab, family)

    def check_target(self, family, cfg, layout, manifest, arrays, slots, options=None) -> None:
        from ckptctl.formats.hf.target import check_target
        check_target(family, cfg, arrays, options)

    def check_format_options(self, opts: dict | None) -> dict:
        from ckptctl.formats.hf.target import check_options
        return check_options(opts)

    def optim_form(self, info, sharding=None) -> str:
        if info and info.get("fresh"):
            return (f"fresh {info['kind']} state made on import (fp32 masters = the weights upcast, zero moments, "
                    "step 0)")
        return "none (a Hugging Face folder holds weights only)"

    def with_grouped_experts(self, src: Source) -> Source:
        """`--moe-grouped-gemm`: the same folder read with TE grouped-GEMM expert keys (`weight{j}`) as the
        Megatron layout, so the target is written with them (TEGroupedMLP; `_extra_state` None: no FP8 state)."""
        from ckptctl.formats.hf.source import inspect
        if not src.cfg.num_experts:
            raise BadInput(f"--moe-grouped-gemm: {src.ckpt.root} is a dense model (no experts)")
        return inspect(Path(src.ckpt.root), src.cfg.true_vocab, src.family, expert_kind="grouped")

    def with_fresh_optimizer(self, src: Source, spec: str) -> Source:
        """`--fresh-optimizer SPEC`: the same source, with the optimizer state a fresh run holds
        (`ckptctl.formats.hf.fresh`), as an iteration-0 checkpoint."""
        import dataclasses

        from ckptctl.formats.hf.fresh import info_of, parse_spec
        kind, args = parse_spec(spec)
        info = info_of(kind, args, src.cfg, src.dist["dtype"])
        ckpt = dataclasses.replace(src.ckpt, iteration=0)
        return dataclasses.replace(src, ckpt=ckpt, optim=info, dist={**src.dist, "fresh": info},
                                   policies={**src.policies, "optimizer": "optimizer"})

    def target_files(self, to, family, cfg, manifest, arrays, slots, iteration, optim_info=None) -> list[str]:
        from math import prod

        from ckptctl.formats.hf import arch as archmod
        from ckptctl.formats.hf import files
        from ckptctl.formats.hf.export import DEFAULT_SHARD
        from ckptctl.formats.hf.names import entries, hf_shape
        a = archmod.choose(family.name, cfg, dict(cfg.extra))
        sizes = [(e.hf, prod(hf_shape(tuple(arrays[e.array]["shape"]), e.steps, cfg)))
                 for e in entries(a, cfg, arrays, cfg.true_vocab)]
        n = len(files.plan_shards(sizes, files.parse_size(DEFAULT_SHARD) // 4))   # upper bound: fp32
        return files.shard_names(n) + ([files.INDEX] if n > 1 else []) + [files.CONFIG, files.GENERATION]

    def common_state(self, src: Source) -> dict:
        from ckptctl.formats.hf.source import HFUnit
        return HFUnit(src.dist).common()

    def source_plan(self, family, cfg, layout, inventories, dist):
        from ckptctl.formats.hf.source import _plan
        return _plan(family.name, cfg, dist["dtype"])[0]

    def unit_opener(self, layout, inventories, dist):
        from ckptctl.formats.hf.source import HFUnit
        return lambda fp: HFUnit(dist)

    def optim_source(self, family, cfg, layout, info, plan, dist):
        if not (dist or {}).get("fresh"):
            raise BadInput("a Hugging Face folder holds no optimizer state")
        from ckptctl.formats.hf.fresh import FreshOptimSource
        from ckptctl.formats.hf.source import HFUnit
        return FreshOptimSource(family, cfg, dist["fresh"], plan, dist["dtype"], lambda: HFUnit(dist))

    def target_phase(self, job, comm, progress) -> dict:
        from ckptctl.formats.hf.target import target_phase
        return target_phase(job, comm, progress)

    def optim_gather(self, src: Source):
        return None


FORMAT = HFFormat()
