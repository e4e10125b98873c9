"""The optimizer state belongs to its parameter: checks that do not trust the decoding (issue 10).

megatron-core keeps an fp32 master of every parameter (distributed optimizer; mixed-precision Adam) and,
after each step, copies it into the model weight (`model_param.copy_(main_param)`: round to nearest even),
so in every checkpoint it saves:

    fp32 weight:       master bytes == weight bytes
    bf16/fp16 weight:  master.to(weight.dtype) bytes == weight bytes

and every moment has the weight's shape. State attached to the wrong parameter (a wrong parameter order,
a wrong bucket offset) breaks this for all but identical-looking parameters, whatever the format. Convert
checks it per source rank (`check_file`, BadInput naming the tensor: exit 2 before any output), verify per
global array with its own reference gather of the weight (`verify_invariant`, a difference). An fp32
parameter of the plain (FP32) Adam optimizer is its own master: there only the shapes are checked.

`check_bucket_chunks`: a `dp_reshardable` bucket saves one chunk per parameter slice (and per alignment gap),
so the chunk boundaries say where megatron-core put each parameter; they must be where the order derived
from the model puts them.
"""
from __future__ import annotations

import torch

from ckptctl.core.diff import Difference
from ckptctl.errors import BadInput


def _raw(t: torch.Tensor) -> bytes:
    t = t.detach().contiguous().reshape(-1)
    return t.view(torch.uint8).numpy().tobytes() if t.numel() else b""


def master_matches(master: torch.Tensor, weight: torch.Tensor) -> bool:
    """The weight is the fp32 master rounded to the weight's dtype, byte for byte."""
    if tuple(master.shape) != tuple(weight.shape):
        return False
    return _raw(master.to(weight.dtype)) == _raw(weight)


def check_file(params, tensors: dict, weight_of, where: str) -> None:
    """Convert's check of one source rank: `tensors` Param.index -> {comp: local state} (as decoded),
    `weight_of(param)` the local weight as the file holds it."""
    for p in params:
        st = tensors.get(p.index)
        if st is None:
            continue
        w = weight_of(p)
        for c, t in st.items():
            if tuple(t.shape) != tuple(w.shape):
                raise BadInput(f"{where}: optimizer {c} of {p.key!r} has shape {tuple(t.shape)}, the weight "
                               f"{tuple(w.shape)}: the state is attached to the wrong parameter")
        m = st.get("param")
        if m is not None and not master_matches(m, w):
            bad = int((m.to(w.dtype).view(-1) != w.reshape(-1)).sum()) if m.shape == w.shape else w.numel()
            raise BadInput(f"{where}: the fp32 master of {p.key!r} is not its weight ({bad} of {w.numel()} elements "
                           f"differ after rounding to {str(w.dtype).removeprefix('torch.')}): the optimizer state is "
                           "attached to the wrong parameter, or the checkpoint was not saved after a step")


def verify_invariant(side: str, array: str, master: torch.Tensor, weight: torch.Tensor):
    """verify's check of one global array (both gathered independently): None, or a Difference."""
    if tuple(master.shape) != tuple(weight.shape):
        return Difference(f"optim/param/{array.removeprefix('model/')}",
                          f"{side}: master shape {tuple(master.shape)}, weight {tuple(weight.shape)}")
    r = master.to(weight.dtype).contiguous().reshape(-1)
    w = weight.contiguous().reshape(-1)
    if r.numel() == 0:
        return None
    ne = r.view(torch.uint8).reshape(r.numel(), -1).ne(w.view(torch.uint8).reshape(w.numel(), -1)).any(dim=1)
    n = int(ne.sum())
    if not n:
        return None
    return Difference(f"optim/param/{array.removeprefix('model/')}",
                      f"{side}: the fp32 master is not the weight ({n} elements differ after rounding to "
                      f"{str(weight.dtype).removeprefix('torch.')}): state attached to the wrong parameter",
                      count=n, first_index=int(ne.nonzero()[0]))


def check_bucket_chunks(chunks: list, key: str, members: list, n: int, where: str) -> None:
    """`members`: (start, end, param) in bucket coordinates, from the model's order. Each parameter's start
    and (unpadded) end must be a boundary of the saved chunks of `key` (one chunk per parameter slice)."""
    cuts = {0, n}
    for off, sizes, *_ in chunks:
        cuts.add(off[0])
        cuts.add(off[0] + sizes[0])
    for s, e, p in members:
        for edge in (s, min(e, n)):
            if edge not in cuts:
                raise BadInput(f"{where}: {key!r}: parameter {p.key!r} ({p.numel} elements) sits at [{s}, {e}) of "
                               "the bucket in megatron-core's order for this model, but the saved chunks do not split "
                               f"at {edge}: the checkpoint's parameter order or bucket settings are not the model's")
