"""torch_dist target phase (every worker): per-worker `.distcp` files of its share of the chunks, then on rank 0
the objects, the common state, `.metadata` (written last, as torch's FileSystemWriter does) and
`metadata.json`. Every file appears through `ckptctl.storage.commit.write_beside`."""
from __future__ import annotations

import io
import json
import pickle
from pathlib import Path

import torch

from ckptctl.core.dtypes import torch_dtype
from ckptctl.errors import CkptctlError
from ckptctl.formats.megatron import iter_dirname, write_tracker
from ckptctl.formats.torch_dist.metadata import COMMON_KEY, CONFIG, BACKEND, METADATA, RNG_KEY
from ckptctl.formats.torch_dist.optim_write import target_additions
from ckptctl.formats.torch_dist.target import DistTarget, plan_target, target_common
from ckptctl.layout import FileCoord
from ckptctl.reshard.comm import assign
from ckptctl.reshard.plan import FilePlan
from ckptctl.storage.commit import write_beside, write_text
from ckptctl.storage.objects import COMMON, empty_like_encoding, get_object, open_target, rng_for
from ckptctl.storage.pickles import dumps_bytes


def _blob(value) -> bytes:
    return dumps_bytes(value)


def target_phase(job, comm, progress) -> dict:
    """Write the torch_dist checkpoint: per-worker .distcp files, then (rank 0) .metadata, metadata.json."""
    store, attrs, family, cfg, src_layout, dst, encs = open_target(job)
    plan = plan_target(family, cfg, dst, attrs["manifest"], attrs["arrays"], set(encs))
    extra = target_additions(job, store, attrs, family, cfg, dst, encs, plan.chunks)
    if extra is not None:
        plan.chunks += extra.chunks
    iteration = attrs.get("iteration", "release")
    it_dir = Path(job.out) / iter_dirname(iteration)
    it_dir.mkdir(parents=True, exist_ok=True)
    mine = assign([c.nbytes + 1 for c in plan.chunks], comm.world)[comm.rank]
    fname = f"__{comm.rank}_0.distcp"
    records = []
    with write_beside(it_dir / fname) as f:
        def put(name, offsets, data: bytes):
            records.append((name, offsets, fname, f.tell(), len(data)))
            f.write(data)

        for i in mine:
            c = plan.chunks[i]
            t = c.tensor(store)
            buf = io.BytesIO()
            torch.save(t, buf)
            put(c.fqn, list(c.offsets), buf.getvalue())
            progress.add(c.nbytes)
        if comm.rank == 0:
            for name, gkey, slot in plan.objects:
                own = f"{gkey}|{BACKEND}|0"
                if slot in encs or own in encs:
                    s = slot if slot in encs else own
                    value = get_object(store, s, encs[s])
                else:
                    sample = next((s for s in encs if s.startswith(gkey + "|")), None)
                    value = empty_like_encoding(get_object(store, sample, encs[sample]) if sample else None)
                put(name, None, _blob([value]))
            for pp in range(dst.pp):
                for tp in range(dst.tp):
                    fc = FileCoord(tp=tp, pp=pp)
                    slot = rng_for(job.rng, src_layout, dst, FilePlan(fc, fc.dirname(dst), ()), encs)
                    if slot is not None and encs[slot] != "none":    # a source saved without RNG: none
                        put(f"{RNG_KEY}/shard_{pp}.{tp}_{dst.pp}.{dst.tp}", None, _blob([get_object(store, slot, encs[slot])]))
            common = get_object(store, COMMON, encs.get(COMMON, "none")) or {}
            padded = cfg.vocab_for_tp(dst.tp) if cfg.true_vocab is not None else cfg.padded_vocab
            common = target_common(common, dst, padded, cfg.num_layers, plan.local_names)
            if extra is not None:
                for name, value in extra.objects:
                    put(name, None, _blob([value]))
                common = extra.common(common)
            put(f"{COMMON_KEY}/shard_0_1", None, _blob([common]))
    progress.add(0, force=True)
    gathered = comm.all_gather_object(records)
    if comm.rank == 0:
        write_metadata(it_dir, plan, [r for g in gathered for r in g])
        write_text(it_dir / CONFIG, json.dumps({"sharded_backend": BACKEND, "sharded_backend_version": 1}))
        write_tracker(Path(job.out), iteration)
    comm.barrier()
    return {"files": comm.world, "bytes": sum(c.nbytes for c in plan.chunks)}


def write_metadata(it_dir: Path, plan: DistTarget, records: list) -> None:
    """The DCP `Metadata` (pickled, as torch's FileSystemWriter does), written last and renamed into place."""
    import uuid

    from torch.distributed.checkpoint.filesystem import _StorageInfo
    from torch.distributed.checkpoint.metadata import (BytesStorageMetadata, ChunkStorageMetadata, Metadata,
                                                       MetadataIndex, StorageMeta, TensorProperties,
                                                       TensorStorageMetadata)

    sdm: dict = {name: None for name in plan.order}     # state-dict order, as a save would list it
    for c in plan.chunks:
        m = sdm.get(c.fqn)
        if m is None:
            m = sdm[c.fqn] = TensorStorageMetadata(TensorProperties(dtype=torch_dtype(c.dtype)), torch.Size(c.gshape), [])
        elif tuple(m.size) != c.gshape:
            raise CkptctlError(f"torch_dist writer: {c.fqn!r} planned with two global shapes")
        m.chunks.append(ChunkStorageMetadata(torch.Size(c.offsets), torch.Size(c.sizes)))
    storage = {}
    for name, offsets, fname, off, length in records:
        if offsets is None:
            sdm[name] = BytesStorageMetadata()
            storage[MetadataIndex(name)] = _StorageInfo(fname, off, length)
        else:
            storage[MetadataIndex(name, torch.Size(offsets))] = _StorageInfo(fname, off, length)
    written = {(n, tuple(o)) for n, o, *_ in records if o is not None}
    missing = [(c.fqn, c.offsets) for c in plan.chunks if (c.fqn, c.offsets) not in written]
    if missing:
        raise CkptctlError(f"torch_dist writer: {len(missing)} chunks were not written (first: {missing[0]})")
    sdm = {k: v for k, v in sdm.items() if v is not None}
    md = Metadata(state_dict_metadata=sdm, planner_data=None, storage_data=storage,
                  storage_meta=StorageMeta(checkpoint_id=str(it_dir), save_id=uuid.uuid4().hex), version="1.0.0")
    with write_beside(it_dir / METADATA) as f:
        pickle.dump(md, f)

