"""Where an element of a legacy checkpoint's optimizer state lies (verify's locations, `Format.optim_locate`).

* distributed optimizer: `distrib_optim.pt` beside the rank file, the flat buffer `[sub][gbuf][dtypes][comp]`
  and the element's offset in it (the parameter's offset from `Context.layout_of`, handed over in
  `Held.buffer`, plus its local flat index), fp32.
* Adam: the rank file's entry that the codec decodes the parameter's state from. It is found by identity
  in the loaded file after `optim_codec.decode_file` (the one place that maps state indices and fp32
  masters to parameters), never by a second mapping.
"""
from __future__ import annotations

from pathlib import Path

from ckptctl.formats.legacy.optim_codec import decode_file
from ckptctl.formats.legacy.optim_kind import DIST_FILE
from ckptctl.storage.pickles import load_pt

FP32 = 4


def locate(src, gather, array: str, comp: str, index: list[int], held, memo: dict) -> dict | None:
    fp = gather.files[held.fi]
    path = Path(gather.paths[fp.dirname])
    if held.buffer is not None:
        s, g, buf, off = held.buffer
        at = off + held.flat
        sub = f"[{s}]" if gather.info["subs"] > 1 else ""
        return {"file": str(path.parent / DIST_FILE),
                "tensor": f"{sub}[{g}][(torch.{buf.dtypes[0]}, torch.{buf.dtypes[1]})][{comp}]",
                "local_index": [at], "byte_offset": at * FP32,
                "buffer": {"sub_optimizer": s, "gbuf": g, "dtypes": list(buf.dtypes), "comp": comp},
                "param": held.param.key, "param_offset": off}
    if fp.dirname not in memo:
        sd = load_pt(path)
        memo[fp.dirname] = (sd, decode_file(gather.ctx, fp, sd, path))
    sd, st = memo[fp.dirname]
    t = st.tensors[held.param.index][comp]
    p = held.param
    entry = _find(sd["optimizer"], t, "optimizer") or (f"{p.chunk}[{p.key}]" if sd[p.chunk][p.key] is t else None)
    if entry is None:
        return None
    return {"file": str(path), "tensor": entry, "local_index": held.local,
            "byte_offset": held.flat * t.element_size(), "param": p.key}


def _find(obj, t, at: str) -> str | None:
    """The path of tensor object `t` inside the nested dicts and lists `obj` (`at` names obj)."""
    if obj is t:
        return at
    if isinstance(obj, dict):
        items = ((f"{at}.{k}" if isinstance(k, str) and "." not in k else f"{at}[{k}]", v) for k, v in obj.items())
    elif isinstance(obj, (list, tuple)):
        items = ((f"{at}[{i}]", v) for i, v in enumerate(obj))
    else:
        return None
    for name, v in items:
        hit = _find(v, t, name)
        if hit is not None:
            return hit
    return None
