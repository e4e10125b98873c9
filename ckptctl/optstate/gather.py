"""verify's gather of optimizer state: the global `optim/<comp>/<array>` tensors assembled rank by rank from
a checkpoint's files (never the store), replicas checked byte for byte against the owner. Format-free: a
format's subclass says how one rank's state is decoded (`state`)."""
from __future__ import annotations

from types import SimpleNamespace

import torch

from ckptctl.core.diff import Difference, byte_diff
from ckptctl.optstate.buffers import writer_flags
from ckptctl.optstate.params import group_of, optim_array, optim_piece, split_subs
from ckptctl.optstate.state import Context, FileState, check_order, owned_pieces, state_indices
from ckptctl.optstate.subopt import canon, hyper


class Gather:
    """The optimizer arrays of one checkpoint over its legacy-view rank plans `files` (`arrays`: the model
    arrays' specs). Each region is taken from the first rank holding it, as the source phase writes it."""

    def __init__(self, family, cfg, layout, info: dict, files: list, arrays: dict):
        self.info, self.files, self.model_arrays = info, files, arrays
        self.ctx = Context(family, cfg, layout, info.get("args", {}), info)
        check_order(self.ctx, files)
        has = [state_indices(self.ctx, fp, writer_flags(layout, fp)) for fp in files]
        owned = owned_pieces(self.ctx, SimpleNamespace(files=files), has)
        self._states: dict[int, FileState] = {}
        self.by_array: dict[str, list] = {}
        for fi, fp in enumerate(files):
            for p in self.ctx.params(fp):
                if p.index not in has[fi]:
                    continue
                for piece, mine in zip(fp.tensors[p.index].pieces, owned[fi][p.index]):
                    self.by_array.setdefault(piece.array, []).append((fi, p.index, piece, mine))

    def decode(self, fi: int) -> FileState:
        """The decoded state of rank plan `fi` (the format's codec)."""
        raise NotImplementedError

    def state(self, fi: int) -> FileState:
        if fi not in self._states:
            self._states[fi] = self.decode(fi)
        return self._states[fi]

    def arrays(self) -> list[str]:
        return [a for a in self.model_arrays if a in self.by_array]

    def gather(self, array: str, comp: str) -> tuple[torch.Tensor, list]:
        out = torch.empty(self.model_arrays[array]["shape"], dtype=torch.float32)
        problems = []
        for fi, idx, piece, owned in sorted(self.by_array[array], key=lambda e: not e[3]):
            q = optim_piece(piece, comp)
            local = self.state(fi).tensors[idx][comp][q.local.slices].reshape(q.gbox.sizes)
            if owned:
                out[q.gbox.slices] = local
            else:
                d = byte_diff(out[q.gbox.slices], local)
                if d is not None:
                    problems.append(Difference(optim_array(array, comp), "replica differs", count=d[0],
                                               first_index=d[1], where=self.files[fi].dirname))
        return out, problems

    def common(self):
        st = self.state(0)
        if self.info["kind"] == "distributed":
            subs = st.common if isinstance(st.common, list) else [st.common]
            return {"step": st.step, "subs": [None if s is None else
                                              {"param_groups": s["optimizer"]["param_groups"],
                                               "grad_scaler": s.get("grad_scaler")} for s in subs]}
        return st.common

    def groups_by_array(self) -> dict[str, str]:
        """Model array -> the hyperparameters (and step) of its param group and its sub-optimizer's grad
        scaler: what a parameter's optimizer settings are, whatever the sub-optimizer structure."""
        subs = self.common()["subs"]
        memo: dict[tuple[int, int], str] = {}
        out: dict[str, str] = {}
        ctx = self.ctx
        for fp in self.files:
            for s, sub in enumerate(split_subs(ctx.params(fp), ctx.info["subs"])):
                groups = subs[s]["param_groups"]
                for p in sub:
                    gi = group_of(p, groups, ctx.args, fp.dirname)
                    if (s, gi) not in memo:
                        memo[s, gi] = canon([hyper(groups[gi]), subs[s].get("grad_scaler")])
                    for piece in fp.tensors[p.index].pieces:
                        out.setdefault(piece.array, memo[s, gi])
        return out
