"""megatron-core's `torch_dist` format (`--ckpt-format torch_dist`, PyTorch DCP underneath): `.metadata` and
blobs (`metadata`), key names (`names`), the source planner and units (`source`), the target planner
(`target`) and writer (`writer`), the optimizer state (`optim_info`, `optim_read`, `optim_write`)."""
from __future__ import annotations

from pathlib import Path

from ckptctl.formats.base import Format, Source


class TorchDistFormat(Format):
    name = "torch_dist"
    megatron_name = "torch_dist"
    detect_order = 10             # its root also has a tracker file: tried before legacy
    # `ckptctl matrix` rows across formats, per family: legacy -> torch_dist and torch_dist -> legacy
    matrix_pairs = {
        "gpt": [("tp2pp2", "tp1pp4", {"swiglu": True, "groups": 2, "optimizer": "none", "to_format": "torch_dist"}),
                ("tp1pp2", "tp2pp1", {"format": "torch_dist", "to_format": "legacy"})],
        # experts on their own axis, both expert kinds
        "moe": [("tp2pp2ep2", "tp1pp1ep4", {"swiglu": True, "optimizer": "none", "to_format": "torch_dist"}),
                ("tp1pp1ep4", "tp2pp1ep2etp1", {"format": "torch_dist", "to_format": "legacy", "grouped": True})],
        # numbered keys, in_proj/conv1d segment keys; MoE layers' experts
        "mamba": [("tp2pp1", "tp1pp2", {"optimizer": "none", "to_format": "torch_dist"}),
                  ("tp2pp2ep2", "tp4pp1", {"format": "torch_dist", "to_format": "legacy", "mamba_groups": 4,
                                           "pattern": "M*EM-E*M", "experts": 4, "moe_ffn": 32})],
    }

    def detect(self, path: Path) -> bool:
        from ckptctl.formats.torch_dist.metadata import is_torch_dist
        return is_torch_dist(path)

    def inspect(self, path, true_vocab=None, family=None) -> Source:
        from ckptctl.formats.torch_dist.inspect import inspect
        return inspect(Path(path), true_vocab, family)

    def check_options(self, optim_sharding):
        from ckptctl.formats.torch_dist.optim_info import check_sharding
        return check_sharding(optim_sharding)     # default dp_reshardable, as Megatron-LM saves

    def check_target(self, family, cfg, layout, manifest, arrays, slots, options=None):
        from ckptctl.formats.torch_dist.target import plan_target
        plan_target(family, cfg, layout, manifest, arrays, slots)

    def optim_form(self, info, sharding=None) -> str:
        from ckptctl.formats.torch_dist.optim_info import form_text
        return form_text(info, sharding)

    def target_files(self, to, family, cfg, manifest, arrays, slots, iteration, optim_info=None) -> list[str]:
        # megatron-core's torch_dist writer: .distcp files of the saving ranks, plus metadata (the common state
        # goes into the .distcp files, as megatron-core 0.19.2 saves it; older checkpoints had common.pt)
        from ckptctl.formats.megatron import TRACKER, iter_dirname
        from ckptctl.formats.torch_dist.target import plan_target
        plan = plan_target(family, cfg, to, manifest, arrays, slots)
        it = iter_dirname(iteration)
        return [f"{it}/{f}" for f in (f"__*_0.distcp ({len(plan.chunks)} chunks)", ".metadata",
                                      "metadata.json")] + [TRACKER]

    def common_state(self, src: Source) -> dict:
        return src.ckpt.common

    def source_plan(self, family, cfg, layout, inventories, dist):
        from ckptctl.formats.torch_dist.source import plan_source
        return plan_source(family, cfg, layout, dist["index"], dist["spec"])

    def unit_opener(self, layout, inventories, dist):
        from ckptctl.formats.torch_dist.source import DistUnit
        return lambda fp: DistUnit(Path(dist["iter_dir"]), dist["index"], layout, fp)

    def optim_source(self, family, cfg, layout, info, plan, dist):
        from ckptctl.formats.torch_dist.optim_read import DistOptimSource
        return DistOptimSource(family, cfg, layout, info, plan, dist)

    def target_phase(self, job, comm, progress) -> dict:
        from ckptctl.formats.torch_dist.writer import target_phase
        return target_phase(job, comm, progress)

    def optim_gather(self, src: Source):
        from ckptctl.formats.torch_dist.optim_read import DistGather
        return DistGather(src)

    def optim_locate(self, src, gather, array, comp, index, held, memo):
        from ckptctl.formats.torch_dist.optim_locate import locate
        return locate(src, gather, array, comp, index, held, memo)


FORMAT = TorchDistFormat()
