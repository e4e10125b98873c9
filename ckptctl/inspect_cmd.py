"""`ckptctl inspect CKPT`: what a checkpoint holds, read from its metadata and key lists (no tensor data).

Works for every registered format and for a ckptctl store (.zarr). Format-specific wording comes from the
format (`Format.optim_form`, `Format.megatron_name`).

Start-up (issue 13 item 5): a format package may have a `lite` module that detects and inspects without
torch (`detect`, `inspect`, `optim_form`, answering as the format's own); importing torch is most of a
torch-path inspect. A store is read from its zarr.json. Whatever a lite reader cannot read, or refuses, goes
the torch path, which gives the verdict and its message: the report never depends on the reader.
"""
from __future__ import annotations

import importlib
import json
from pathlib import Path

from ckptctl.formats import registry
from ckptctl.layout import Layout

# Non-model state a checkpoint may carry, by the policy key `convert.inspect` reports for it.
_STATE = {"iteration": "iteration", "opt_param_scheduler": "learning-rate scheduler",
          "rng_state": "RNG state", "num_floating_point_operations_so_far": "FLOPs counter",
          "args": "Megatron args (consumed samples, hyperparameters)"}


def _iteration_files(src) -> list[Path]:
    """Every file of the iteration directory (model_optim_rng.pt, distrib_optim.pt, *.distcp ...)."""
    return [p for p in Path(src.ckpt.iter_dir).rglob("*") if p.is_file()]


def layout_json(layout: Layout) -> dict:
    return {"name": str(layout), "world_size": layout.world, **layout.to_json(), "etp": layout.expert_tp}


def _volume(shape) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def _itemsize(dtype: str) -> int:
    from ckptctl.core.dtypes import itemsize
    return itemsize(dtype)


def _weights(arrays: dict) -> dict:
    model = {a: s for a, s in arrays.items() if a.startswith("model/")}
    dtypes: dict[str, int] = {}
    for s in model.values():
        dtypes[s["dtype"]] = dtypes.get(s["dtype"], 0) + 1
    return {"tensors": len(model), "bytes": sum(_volume(s["shape"]) * _itemsize(s["dtype"]) for s in model.values()),
            "dtypes": dtypes}


def _optimizer(info: dict | None, arrays: dict, form: str | None) -> dict | None:
    """Optimizer state in global (unique) bytes: each component is fp32, one per element of its weight."""
    if info is None:
        return None
    elems = sum(_volume(s["shape"]) for a, s in arrays.items() if a.startswith("model/"))
    comps = list(info["comps"])
    return {"kind": info["kind"], "variant": info["variant"], "sub_optimizers": info.get("subs", 1),
            "components": comps, "sharding": info.get("sharding"), "form": form,
            "tensors": len([a for a in arrays if a.startswith("model/")]) * len(comps),
            "bytes": elems * 4 * len(comps), "step_and_param_groups": True}


def _lite_module(fmt):
    """The format package's torch-free reader, or None."""
    name = f"{type(fmt).__module__}.lite"
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as e:
        if e.name == name:
            return None
        raise


def _inspect_lite(path: Path, true_vocab: int | None):
    """(Source, optim_form) read without torch, or None: the torch path decides. Formats are tried in the
    registry's detection order; one without a lite reader ahead of the match means torch decides."""
    try:
        for fmt in registry.formats():
            lite = _lite_module(fmt)
            if lite is None:
                return None
            if lite.detect(path):
                break
        else:
            lite = _lite_module(registry.fallback())
            if lite is None:
                return None
        return lite.inspect(path, true_vocab), lite.optim_form
    except Exception as e:  # noqa: BLE001 - NotLite or a refusal: the torch path reads it again and gives the verdict
        from ckptctl.guard import Interrupted
        if isinstance(e, Interrupted):   # a signal (CkptctlError) ends the command, never starts the torch path
            raise
        return None


def describe(path: Path, true_vocab: int | None = None, lite: bool = True) -> dict:
    """The inspect report of a checkpoint folder or a ckptctl store (`lite`: try the torch-free readers)."""
    path = Path(path)
    if (path / "zarr.json").is_file():
        return _describe_store(path, lite)
    got = _inspect_lite(path, true_vocab) if lite else None
    if got is None:
        fmt = registry.detect(path)
        got = fmt.inspect(path, true_vocab), fmt.optim_form
    src, optim_form = got
    files = _iteration_files(src)
    weights = _weights(src.plan.arrays)
    opt = _optimizer(src.optim, src.plan.arrays, optim_form(src.optim, src.optim.get("sharding")) if src.optim else None)
    if opt is None and src.policies.get("optimizer") == "optimizer":
        # State is there but no decoder knows its form (convert drops it and says so).
        opt = {"kind": "unrecognised", "variant": None, "sub_optimizers": 0, "components": [], "sharding": None,
               "form": "present, not a form ckptctl converts: dropped by convert", "tensors": 0, "bytes": 0}
    state = {k: label for k, label in _STATE.items() if k in src.policies}
    if "args" in src.policies:
        state["consumed_train_samples"] = src.ckpt.args.get("consumed_train_samples")
    extra = sum(len(fp.objects) for fp in src.plan.files)
    return {
        "ok": True, "path": str(path), "kind": "checkpoint",
        "format": src.fmt, "megatron_ckpt_format": registry.megatron_name(src.fmt),
        "family": src.family, "layout": layout_json(src.layout), "iteration": src.ckpt.iteration,
        "model": src.cfg.to_json(),
        "optimizer": opt,
        "training_state": state,
        "extra_state_entries": extra,
        "dropped_on_convert": sorted(k for k, p in src.policies.items() if p == "dropped"),
        "bytes": {"weights": weights["bytes"], "optimizer": opt["bytes"] if opt else 0,
                  "on_disk": sum(f.stat().st_size for f in files)},
        "tensors": {"weights": weights["tensors"], "optimizer": opt["tensors"] if opt else 0},
        "weight_dtypes": weights["dtypes"],
        "files": len(files), "rank_files": len(src.plan.files),
    }


def _store_attrs(path: Path, lite: bool) -> dict:
    """The store's attributes: from zarr.json when it is plainly a ckptctl store (as `Store.open` checks),
    else through `Store.open` (zarr imported), which refuses what is not."""
    if lite:
        try:
            meta = json.loads((path / "zarr.json").read_text())
            attrs = meta.get("attributes", {})
            if meta.get("zarr_format") == 3 and meta.get("node_type") == "group" and isinstance(attrs, dict) \
                    and attrs.get("format") == "ckptctl-store":       # store.FORMAT
                return dict(attrs)
        except (OSError, ValueError, AttributeError):
            pass
    from ckptctl.store import Store
    return Store.open(path).attrs


def _describe_store(path: Path, lite: bool = True) -> dict:
    attrs = _store_attrs(path, lite)
    from ckptctl.errors import BadInput
    if "source_layout" not in attrs:
        raise BadInput(f"{path}: the store has no source layout (its source phase did not finish)")
    layout = Layout.from_json(attrs["source_layout"])
    arrays = attrs.get("arrays", {})
    weights = _weights(arrays)
    info = attrs.get("optimizer")
    opt = _optimizer(info, arrays, None) if info else None
    files = [p for p in path.rglob("*") if p.is_file()]
    fmt = attrs.get("source_format") or registry.fallback().name
    return {
        "ok": True, "path": str(path), "kind": "store", "complete": bool(attrs.get("complete")),
        "format": "store", "source_format": fmt, "megatron_ckpt_format": None,
        "family": attrs.get("family"), "layout": layout_json(layout), "iteration": attrs.get("iteration"),
        "model": attrs.get("config"), "optimizer": opt,
        "training_state": {"iteration": "iteration",
                           "objects": f"{len(attrs.get('objects', {}))} stored objects (args, RNG, extra state)"},
        "dropped_on_convert": attrs.get("dropped", []),
        "bytes": {"weights": weights["bytes"], "optimizer": opt["bytes"] if opt else 0,
                  "on_disk": sum(f.stat().st_size for f in files)},
        "tensors": {"weights": weights["tensors"], "optimizer": opt["tensors"] if opt else 0},
        "weight_dtypes": weights["dtypes"], "files": len(files),
    }


def render(d: dict, say) -> None:
    """Text form: one fact per line, `say(line)` prints it."""
    from ckptctl.output import human_bytes
    lay = d["layout"]
    fmt = d["format"] if d["kind"] == "checkpoint" else f"ckptctl store (from {d['source_format']})"
    meg = f" (Megatron --ckpt-format {d['megatron_ckpt_format']})" if d.get("megatron_ckpt_format") else ""
    say(f"{d['path']}: {d['family']} checkpoint, format {fmt}{meg}")
    say(f"  layout      {lay['name']}  (world size {lay['world_size']}: TP {lay['tp']}, PP {lay['pp']}, "
        f"VPP {lay['vpp']}, EP {lay['ep']}, ETP {lay['etp']}, DP {lay['dp']}, CP {lay['cp']})")
    say(f"  iteration   {d['iteration']}")
    m = d.get("model") or {}
    parts = [f"{k} {m[k]}" for k in ("num_layers", "hidden", "heads", "groups", "ffn", "padded_vocab", "true_vocab",
                                     "num_experts") if m.get(k) not in (None, 0)]
    flags = [k for k in ("glu", "tied") if m.get(k)]
    say("  model       " + ", ".join(parts + flags))
    dt = ", ".join(f"{k} x{v}" for k, v in d["weight_dtypes"].items())
    b, t = d["bytes"], d["tensors"]
    say(f"  weights     {t['weights']} tensors, {human_bytes(b['weights'])} ({dt})")
    o = d.get("optimizer")
    if o and o["kind"] == "unrecognised":
        say(f"  optimizer   {o['form']}")
    elif o:
        variant = "" if o["variant"] == o["kind"] else f"{o['variant']}, "
        say(f"  optimizer   {o['kind']} ({variant}{o['sub_optimizers']} sub-optimizer"
            f"{'s' if o['sub_optimizers'] != 1 else ''}): {t['optimizer']} tensors "
            f"({', '.join(o['components'])}), {human_bytes(b['optimizer'])}")
        if o.get("form"):
            say(f"  sharding    {o['form']}")
    else:
        say("  optimizer   none")
    ts = d.get("training_state")
    if isinstance(ts, dict) and ts:
        say("  state       " + ", ".join(f"{v}" if k != "consumed_train_samples" else f"consumed samples {v}"
                                         for k, v in ts.items()))
    if d.get("dropped_on_convert"):
        say("  not carried " + ", ".join(d["dropped_on_convert"]))
    say(f"  on disk     {d['files']} files, {human_bytes(b['on_disk'])}")
