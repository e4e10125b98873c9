"""The legacy format's optimizer state in the worker phases and in verify: the source side decodes each rank
file and writes the regions it owns to the store; the target side encodes the restructured state into each
target rank file; the gather decodes rank files for verify."""
from __future__ import annotations

from pathlib import Path

from ckptctl.errors import BadInput
from ckptctl.formats.legacy.optim_codec import decode_file, write_target
from ckptctl.optstate import check as optim_check
from ckptctl.optstate.buffers import writer_flags
from ckptctl.optstate.gather import Gather
from ckptctl.optstate.params import optim_piece
from ckptctl.optstate.state import Context, FileState, check_order, owned_pieces, plan_arrays, state_indices
from ckptctl.optstate.subopt import TargetState
from ckptctl.reshard.stream import put_rows, release_pages, row_blocks
from ckptctl.storage.pickles import load_pt


class SourceSide:
    """Source phase: decode each rank file's optimizer state and write the regions it owns.

    The decoded state is views on the memory-mapped rank files (distrib_optim.pt's flat buffers, the Adam
    state of model_optim_rng.pt), and a page once touched stays in the worker's RSS: the state is checked
    and written in row blocks of the worker's `Budget.block`, each block's pages dropped after it
    (`reshard.stream.release_pages`), as the weights are, so the worker's peak does not grow with the file (issue 5).
    """

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

    def write_file(self, store, i: int, fp, sd: dict, model_path: Path, progress, block: int) -> FileState:
        """`block`: the worker's `Budget.block`: the state moves in the weights' blocks, pages dropped after each."""
        where = str(model_path)
        st = decode_file(self.ctx, fp, sd, model_path)
        # the state must be its parameter's (issue 10), checked before anything of it is written
        for p in self.ctx.params(fp):
            if p.index in st.tensors:
                _check_param(p, st.tensors[p.index], sd[p.chunk][p.key], block, where)
        for idx, flags in self.owned[i].items():
            if idx not in st.tensors:
                raise BadInput(f"{where}: no optimizer state for {fp.tensors[idx].key!r}")
            for piece, mine in zip(fp.tensors[idx].pieces, flags):
                for c in self.info["comps"] if mine else ():
                    q = optim_piece(piece, c)
                    put_rows(store, q, st.tensors[idx][c][q.local.slices], block, progress, True)
        return st


def _check_param(p, state: dict, weight, block: int, where: str) -> None:
    """`optim_check.check_file` of one parameter, row block by row block, the pages of the master and the
    weight dropped after each; a failing block is checked again whole, for the message's full counts."""
    if any(t.dim() == 0 or t.shape[0] != weight.shape[0] for t in (weight, *state.values())):
        optim_check.check_file([p], {p.index: state}, lambda _: weight, where)
        return
    try:   # a block holds the master's rows, the weight's and a bytes copy of each (check._raw): half a block each
        for r0, r1 in row_blocks(weight.shape[0], weight[0].numel() * 4, block // 2):
            rows = {c: t[r0:r1] for c, t in state.items()}
            optim_check.check_file([p], {p.index: rows}, lambda _: weight[r0:r1], where)
            for t in (weight[r0:r1], rows.get("param")):
                if t is not None:
                    release_pages(t)
    except BadInput:
        optim_check.check_file([p], {p.index: state}, lambda _: weight, where)
        raise


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
