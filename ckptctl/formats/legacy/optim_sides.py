"""The legacy format's optimizer state in the worker phases and in verify: the source side decodes each rank
file and writes the regions it owns to the store; the target side encodes the restructured state into each
target rank file; the gather decodes rank files for verify."""
from __future__ import annotations

from pathlib import Path

from ckptctl.formats.legacy.optim_codec import decode_file, write_target
from ckptctl.optstate import check as optim_check
from ckptctl.optstate.buffers import writer_flags
from ckptctl.optstate.gather import Gather
from ckptctl.optstate.state import (Context, FileState, check_order, owned_pieces, plan_arrays, state_indices,
                                    write_owned)
from ckptctl.optstate.subopt import TargetState
from ckptctl.storage.pickles import load_pt


class SourceSide:
    """Source phase: decode each rank file's optimizer state and write the regions it owns."""

    def __init__(self, family, cfg, layout, info: dict, plan):
        self.ctx = Context(family, cfg, layout, info.get("args", {}), info)
        self.info, self.plan = info, plan
        check_order(self.ctx, plan.files)
        self.has = [state_indices(self.ctx, fp, writer_flags(layout, fp)) for fp in plan.files]
        self.owned = owned_pieces(self.ctx, plan, self.has)

    def arrays(self) -> dict[str, dict]:
        return plan_arrays(self.plan, self.info["comps"])

    def owned_bytes(self, i: int) -> int:
        fp = self.plan.files[i]
        return sum(fp.tensors[k].pieces[j].local.volume * 4 * len(self.info["comps"])
                   for k, flags in self.owned[i].items() for j, o in enumerate(flags) if o)

    def write_file(self, store, i: int, fp, sd: dict, model_path: Path, progress=None) -> FileState:
        st = decode_file(self.ctx, fp, sd, model_path)
        # the state must be its parameter's (issue 10), checked before anything of it is written
        optim_check.check_file(self.ctx.params(fp), st.tensors, lambda p: sd[p.chunk][p.key], str(model_path))
        write_owned(store, fp, self.owned[i], st.tensors, self.info["comps"], progress, str(model_path))
        return st


class TargetSide(TargetState):
    """Target phase: the restructured state encoded into each target rank file (and its distrib_optim.pt)."""

    def write(self, reader, fp, sd: dict, out_dir: Path, block: int | None = None) -> int:
        """`block`: the worker's `Budget.block`, what distrib_optim.pt is streamed in."""
        return write_target(self.ctx, reader, fp, sd, out_dir, self.common, block)


def form_text(info: dict) -> str:
    """What a legacy checkpoint holds of this optimizer state."""
    return ("distributed optimizer (distrib_optim.pt flat buffers + param groups)" if info["kind"] == "distributed"
            else f"Adam state dict ({'fp32' if info['variant'] == 'fp32' else 'mixed precision, fp32 masters'})")


class LegacyGather(Gather):
    """verify's gather of a legacy checkpoint's optimizer state, rank file by rank file."""

    def __init__(self, src):
        from ckptctl.models import get_family
        super().__init__(get_family(src.family), src.cfg, src.layout, src.optim, src.plan.files, src.plan.arrays)
        self.paths = {i["dirname"]: Path(i["path"]) for i in src.inventories}

    def decode(self, fi: int) -> FileState:
        fp = self.files[fi]
        path = self.paths[fp.dirname]
        return decode_file(self.ctx, fp, load_pt(path), path)
