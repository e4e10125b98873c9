"""Megatron-LM's legacy `torch` format (`--ckpt-format torch`): one `model_optim_rng.pt` per model-parallel
rank (`files`), the optimizer codec (`optim_codec`, `optim_sides`), inspect and the target writer."""
from __future__ import annotations

from pathlib import Path

from ckptctl.formats.base import Format, Source


class LegacyFormat(Format):
    name = "legacy"
    aliases = ("torch",)
    megatron_name = "torch"
    detect_order = 50
    fallback = True               # open_legacy names what is missing (no tracker, no mp_rank_* ...)
    writes_examples = True
    memory_mapped = True          # rank files are loaded with mmap=True
    indices_rebuilt = True        # Adam state dicts index parameters: rebuilt for the target
    workers_share_files = True    # records of one rank file cut over all workers (parallel_write.py)

    def detect(self, path: Path) -> bool:
        from ckptctl.formats.legacy.files import is_legacy
        return is_legacy(path)

    def inspect(self, path, true_vocab=None, family=None) -> Source:
        from ckptctl.formats.legacy.inspect import inspect
        return inspect(path, true_vocab, family)

    def optim_form(self, info, sharding=None) -> str:
        from ckptctl.formats.legacy.optim_sides import form_text
        return form_text(info)

    def policy_extra(self, info, optimizer):
        from ckptctl.formats.legacy.optim_codec import DIST_FILE
        if not info or info["kind"] != "distributed":
            return {}
        return {DIST_FILE: ("re-encoded per target model directory (flat buffers for the target's bucket layout "
                            "and DP size)" if optimizer else "dropped (--no-optimizer)")}

    def target_files(self, to, family, cfg, manifest, arrays, slots, iteration, optim_info=None) -> list[str]:
        from ckptctl.formats.legacy.files import MODEL_FILE
        from ckptctl.formats.legacy.optim_kind import DIST_FILE
        from ckptctl.formats.megatron import TRACKER, iter_dirname
        it = iter_dirname(iteration)
        # the distributed optimizer's state sits beside each model file (write_target), as Megatron-LM saves it
        names = [MODEL_FILE] + ([DIST_FILE] if optim_info and optim_info.get("kind") == "distributed" else [])
        return [f"{it}/{fc.dirname(to)}/{n}" for fc in to.model_files for n in names] + [TRACKER]

    def common_state(self, src: Source) -> dict:
        from ckptctl.storage.pickles import load_pt
        return load_pt(src.ckpt.file_list[0][1])

    def source_plan(self, family, cfg, layout, inventories, dist):
        from ckptctl.formats.legacy.files import inventories_from_json
        from ckptctl.reshard.plan import plan_source
        return plan_source(family, cfg, layout, inventories_from_json(inventories))

    def unit_opener(self, layout, inventories, dist):
        from ckptctl.formats.legacy.files import LegacyUnit
        from ckptctl.storage.pickles import load_pt
        paths = {i["dirname"]: Path(i["path"]) for i in inventories}
        return lambda fp: LegacyUnit(load_pt(paths[fp.dirname]), fp.dirname, paths[fp.dirname])

    def optim_source(self, family, cfg, layout, info, plan, dist):
        from ckptctl.formats.legacy.optim_sides import SourceSide
        return SourceSide(family, cfg, layout, info, plan)

    def target_phase(self, job, comm, progress) -> dict:
        from ckptctl.formats.legacy.writer import target_phase
        return target_phase(job, comm, progress)

    def write_example(self, fam, cfg, layout, out, src, arrays, dtype, seed, optim) -> dict:
        from ckptctl.formats.legacy.example import write_example
        return write_example(fam, cfg, layout, out, src, arrays, dtype, seed, optim)

    def optim_gather(self, src: Source):
        from ckptctl.formats.legacy.optim_sides import LegacyGather
        return LegacyGather(src)

    def optim_locate(self, src, gather, array, comp, index, held, memo):
        from ckptctl.formats.legacy.optim_locate import locate
        return locate(src, gather, array, comp, index, held, memo)


FORMAT = LegacyFormat()
