"""Reading torch_dist optimizer state (source workers and verify): `fully_reshardable` and the non-distributed
optimizer's model-space tensors as store-array regions (`ModelSpace`), `dp_reshardable` buckets reassembled
into the flat buffers of a legacy `distrib_optim.pt` (`BucketSpace`), decoded per source model-parallel rank
through the legacy plan of the source layout (`Decoder`)."""
from __future__ import annotations

import dataclasses
from pathlib import Path
from types import SimpleNamespace

import torch

from ckptctl.box import Box
from ckptctl.core.coverage import missing
from ckptctl.errors import BadInput
from ckptctl.formats.torch_dist.metadata import COMMON_KEY, COMMON_PT, load_object, load_tensor
from ckptctl.formats.torch_dist.optim_info import (ADAM_NAMES, DIST_NAMES, STATE, adam_common, bucket_key,
                                                       chained, dist_commons, group_index, sub_dp)
from ckptctl.formats.torch_dist.source import DistUnit, plan_source
from ckptctl.optstate.check import check_bucket_chunks, check_file
from ckptctl.optstate.buffers import bucket_size_of, buffer_layout
from ckptctl.optstate.flat import decode_distributed
from ckptctl.optstate.gather import Gather
from ckptctl.optstate.params import ADAM_KEYS, optim_array
from ckptctl.optstate.state import (Context, FileState, check_order, fill_tensors, owned_pieces, plan_arrays,
                                    write_owned)
from ckptctl.reshard.comm import assign
from ckptctl.reshard.plan import plan_target
from ckptctl.storage.objects import OPTIM_COMMON, put_object
from ckptctl.storage.pickles import load_pt


# --- reading ------------------------------------------------------------------------------------

def legacy_files(family, cfg, layout, plan) -> list:
    """The legacy rank-file plans of `layout` over the store arrays of `plan` (named_parameters order)."""
    return plan_target(family, cfg, layout, plan.manifest, plan.arrays, set(plan.slots))


class ModelSpace:
    """`fully_reshardable` tensors as a reader of store-array regions: read(optim/<comp>/<array>, box)."""

    def __init__(self, family, cfg, layout, dist: dict, names: dict = DIST_NAMES, own_master: bool = False):
        """`names`: store component -> state name; `own_master`: an fp32 model tensor without a master
        key is its own `param` (mixed-precision non-distributed optimizer)."""
        index, self.iter_dir = dist["index"], Path(dist["iter_dir"])
        self.pieces: dict[str, list] = {}
        for comp in ADAM_KEYS + ("param",):
            pre = f"{STATE}{names[comp]}."
            tensors = index["tensors"]
            real = {n[len(pre):]: n for n in index["order"] if n in tensors and n.startswith(pre)}
            if comp == "param" and own_master:
                real.update({n: n for n in index["order"] if n in tensors and n not in real
                             and not n.startswith(("optimizer", "chained_")) and tensors[n].get("dtype") == "float32"})
            if not real:
                continue
            sub = {"tensors": {k: index["tensors"][v] for k, v in real.items()}, "objects": {}, "order": list(real)}
            sp = plan_source(family, cfg, layout, sub, dist["spec"])
            for fp in sp.files:
                for t in fp.tensors:
                    item = dataclasses.replace(t, chunk=real[t.chunk])
                    for p in t.pieces:
                        self.pieces.setdefault(optim_array(p.array, comp), []).append((item, p))
        self.unit = DistUnit(self.iter_dir, index, layout, None)

    def read(self, name: str, box: Box) -> torch.Tensor:
        out, got = _assemble(self.unit, self.pieces.get(name, ()), box, torch.float32)
        if missing(got, box.volume):
            raise BadInput(f"{self.iter_dir}: the fully_reshardable chunks of {name!r} {missing(got, box.volume)} "
                           "a rank needs")
        return out


class BucketSpace:
    """`dp_reshardable` tensors of one model-parallel rank, reassembled into the legacy flat buffers."""

    def __init__(self, dist: dict):
        self.iter_dir, self.index = Path(dist["iter_dir"]), dist["index"]

    def flat(self, key: str) -> torch.Tensor:
        t = self.index["tensors"][key]
        (n,) = t["shape"]
        out = torch.empty(n, dtype=torch.float32)
        got = 0
        for off, sizes, *ref in t["chunks"]:
            x = load_tensor(self.iter_dir, ref, key)
            if tuple(x.shape) != tuple(sizes) or x.dtype != torch.float32:
                raise BadInput(f"{self.iter_dir / ref[0]}: chunk {off} of {key!r} holds {x.dtype} {tuple(x.shape)}")
            out[off[0]:off[0] + sizes[0]] = x
            got += sizes[0]
        if missing(got, n):
            raise BadInput(f"{self.iter_dir}: the chunks of {key!r} {missing(got, n)}")
        return out

    def state(self, g: int, bufs: list, comps, expected: list[list[int]], where: str, pre: str = "",
              lays: list | None = None) -> dict:
        """The `distrib_optim.pt` dict of rank g: each buffer's buckets concatenated. `lays` (per buffer,
        `buffer_layout`): each parameter's range must be a span of the saved chunks."""
        state: dict = {"buckets_coalesced": True}
        for gi, (buf, sizes) in enumerate(zip(bufs, expected)):
            e = {}
            for c in comps:
                parts = []
                for b, size in enumerate(sizes):
                    key = bucket_key(g, gi, buf.dtypes, b, c, pre)
                    t = self.index["tensors"].get(key)
                    if t is None:
                        raise BadInput(f"{where}: no {key!r} (the model layout gives {len(sizes)} bucket(s) in "
                                       f"buffer {gi}; different bucket settings?)")
                    if t["shape"] != [size]:
                        raise BadInput(f"{where}: {key!r} has {t['shape']} elements, the model layout gives [{size}]")
                    if lays is not None:
                        pos, buckets = lays[gi]
                        b0 = buckets[b][0]
                        members = [(st - b0, en - b0, p) for (st, en, bi), p in zip(pos, buf.params) if bi == b]
                        check_bucket_chunks(t["chunks"], key, members, size, where)
                    parts.append(self.flat(key))
                extra = bucket_key(g, gi, buf.dtypes, len(sizes), c, pre)
                if extra in self.index["tensors"]:
                    raise BadInput(f"{where}: {extra!r} is beyond the {len(sizes)} bucket(s) the model layout gives")
                e[c] = torch.cat(parts)
            e["numel_unpadded"] = sum(sizes)
            state[gi] = {tuple(getattr(torch, d) for d in buf.dtypes): e}
        return state


def bucket_layouts(ctx, fp, bufs: list, pp_rank: int, sub: int, total: int) -> list[tuple[list, list]]:
    """Per buffer of sub-optimizer `sub`, `buffer_layout` (param ranges and buckets) under the
    context's DDP settings (`total`: the rank's parameter count, as `Context.layout_of` takes it)."""
    dp = sub_dp(ctx.layout, sub)
    out = []
    for buf in bufs:
        bs = bucket_size_of(ctx.args, ctx.layout, pp_rank, buf.chunk_index, total)
        out.append(buffer_layout([p.numel for p in buf.params], [p.shared for p in buf.params], bs, dp,
                                       bool(ctx.args.get("ddp_pad_buckets_for_high_nccl_busbw"))))
    return out


class Decoder:
    """Per source model-parallel rank: the decoded `FileState` of its parameters."""

    def __init__(self, family, cfg, layout, info: dict, plan, dist: dict):
        self.info, self.dist, self.layout = info, dist, layout
        self.files = legacy_files(family, cfg, layout, plan)
        self.ctx = Context(family, cfg, layout, info.get("args", {}), info)
        self.adam = info["kind"] == "adam"
        self.model = (ModelSpace(family, cfg, layout, dist, ADAM_NAMES, info["variant"] == "float16") if self.adam else
                      ModelSpace(family, cfg, layout, dist) if info.get("sharding") == "fully_reshardable" else None)
        self.buckets = BucketSpace(dist) if self.model is None else None
        self.iter_dir = Path(dist["iter_dir"])
        # every parameter placed by the model's order (the plan follows it; `.metadata` order is never used)
        check_order(self.ctx, self.files)

    def whole_common(self) -> dict:
        """The checkpoint's common state (read once)."""
        if getattr(self, "_common", None) is None:
            ref = self.dist["index"]["objects"].get(f"{COMMON_KEY}/shard_0_1")
            self._common = (load_object(self.iter_dir, ref, COMMON_KEY) if ref else
                            load_pt(self.iter_dir / COMMON_PT, mmap=False))
        return self._common

    def common(self, fp) -> object:
        """The legacy `optimizer` key of a rank file: {"optimizer": param groups with step, ["grad_scaler"]},
        a list of them with several sub-optimizers."""
        n = self.info["subs"]
        groups = [group_index(self.layout, fp.coord, s) for s in range(n)]
        subs = dist_commons(self.dist["index"], self.iter_dir, self.whole_common().get("optimizer"),
                            self.info["sharding"], groups)
        return subs[0] if n == 1 else subs

    def decode(self, i: int) -> FileState:
        fp = self.files[i]
        params = self.ctx.params(fp)
        comps = self.info["comps"]
        if self.adam:
            common = adam_common(self.whole_common().get("optimizer"), self.info["variant"], self.iter_dir)
            return FileState(fill_tensors(self.model, fp, params, comps), common, common["step"])
        common = self.common(fp)
        steps = {pg.get("step") for c in (common if isinstance(common, list) else [common])
                 for pg in c["optimizer"]["param_groups"]}
        step = next(iter(steps)) if len(steps) == 1 else None
        if self.model is not None:
            return FileState(fill_tensors(self.model, fp, params, comps), common, step)
        subs, bufs = self.ctx.layout_of(fp, params)
        total = sum(p.numel for p in params)
        states = []
        for s, sub_bufs in enumerate(bufs):
            g = group_index(self.layout, fp.coord, s)
            lays = bucket_layouts(self.ctx, fp, sub_bufs, fp.coord.pp, s, total)
            sizes = [[b[2] for b in lay[1]] for lay in lays]
            where = f"{self.iter_dir} ({chained(s, len(bufs))}dp_group_idx_{g}, {fp.dirname})"
            states.append(self.buckets.state(g, sub_bufs, comps, sizes, where, chained(s, len(bufs)), lays))
        where = f"{self.iter_dir} ({fp.dirname})"
        state = states[0] if len(states) == 1 else states
        return FileState(decode_distributed(state, subs, bufs, where), common, step)


class DistOptimSource:
    """Source phase: every worker decodes its share of the source model-parallel ranks and writes the
    store regions each owns (the first rank holding a region, as for legacy files)."""

    def __init__(self, family, cfg, layout, info: dict, plan, dist: dict):
        self.info, self.plan = info, plan
        self.dec = Decoder(family, cfg, layout, info, plan, dist)
        files = self.dec.files
        self.owned = owned_pieces(self.dec.ctx, SimpleNamespace(files=files),
                                        [{p.index for p in self.dec.ctx.params(fp)} for fp in files])

    def arrays(self) -> dict[str, dict]:
        return plan_arrays(self.plan, self.info["comps"])

    def run(self, store, comm, progress) -> dict:
        """Decode and write this worker's ranks; returns the object encodings to record (rank 0: common)."""
        files = self.dec.files
        sizes = [sum(p.numel for p in self.dec.ctx.params(fp)) + 1 for fp in files]
        encodings = {}
        weights = DistWeights(self.plan, self.dec.dist, self.dec.layout)
        for i in assign(sizes, comm.world)[comm.rank]:
            fp = files[i]
            st = self.dec.decode(i)
            # the state must be its parameter's (issue 10): the master against the weight in the chunks
            check_file(self.dec.ctx.params(fp), st.tensors, lambda p: weights.weight(fp, p),
                                   f"{self.dec.iter_dir} ({fp.dirname})")
            write_owned(store, fp, self.owned[i], st.tensors, self.info["comps"], progress,
                        f"{self.dec.iter_dir} ({fp.dirname})")
            if i == 0:
                encodings[OPTIM_COMMON] = put_object(store, OPTIM_COMMON, st.common)
        return encodings


class DistGather(Gather):
    """verify's gather of a torch_dist checkpoint's optimizer state (rank by rank, never the store)."""

    def __init__(self, src):
        from ckptctl.models import get_family
        self.dec = Decoder(get_family(src.family), src.cfg, src.layout, src.optim, src.plan, src.dist)
        super().__init__(get_family(src.family), src.cfg, src.layout, src.optim, self.dec.files, src.plan.arrays)

    def decode(self, fi: int) -> FileState:
        return self.dec.decode(fi)


class DistWeights:
    """The local weights of a legacy-view rank plan, read from a torch_dist source's model chunks."""

    def __init__(self, plan, dist: dict, layout):
        self.by_array: dict[str, list] = {}
        self.unit = DistUnit(Path(dist["iter_dir"]), dist["index"], layout, None)
        for fp in plan.files:
            for t in fp.tensors:
                for p in t.pieces:
                    self.by_array.setdefault(p.array, []).append((t, p))

    def region(self, array: str, box, dtype) -> torch.Tensor:
        out, got = _assemble(self.unit, self.by_array.get(array, ()), box, dtype)
        if missing(got, box.volume):
            raise BadInput(f"{array}: the torch_dist chunks {missing(got, box.volume)} a rank holds")
        return out

    def weight(self, fp, p) -> torch.Tensor:
        """Param `p` of legacy-view plan `fp`: its local tensor (new vocab rows, if any, are zero)."""
        t = fp.tensors[p.index]
        dtype = getattr(torch, p.dtype)
        buf = (torch.empty if t.covered == p.numel else torch.zeros)(p.shape, dtype=dtype)
        for piece in t.pieces:
            buf[piece.local.slices] = self.region(piece.array, piece.gbox, dtype).reshape(piece.local.sizes)
        return buf


def _assemble(unit, pieces, box: Box, dtype) -> tuple[torch.Tensor, int]:
    """The region `box` of one global array from the (item, piece) pairs that hold parts of it, and how
    many of its elements they covered (the caller names what is missing)."""
    out = torch.empty(box.sizes, dtype=dtype)
    got = 0
    for item, p in pieces:
        hit = p.gbox.intersect(box)
        if hit is None:
            continue
        x = unit.tensor(item)
        src = hit.shift(tuple(lo - g for lo, g in zip(p.local.offsets, p.gbox.offsets)))
        out[hit.shift(tuple(-o for o in box.offsets)).slices] = x[src.slices]
        got += hit.volume
    return out, got
