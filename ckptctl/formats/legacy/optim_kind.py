"""Which optimizer state a legacy rank file carries, told from its `optimizer` entry and the files beside it,
without torch: `optim_codec.detect` adds the merge check of several sub-optimizers (tensor bytes), inspect's
torch-free reader takes this as is."""
from __future__ import annotations

from pathlib import Path

from ckptctl.errors import BadInput

DIST_FILE = "distrib_optim.pt"


def variant(sd: dict, model_path: Path) -> dict | None:
    """{"kind", "variant", "subs"} of a rank file's optimizer state, None when it carries none; BadInput for
    the layouts and entries the codec does not support."""
    d = Path(model_path).parent
    for bad in sorted(d.glob("layer_wise_optimizer_*.pt"))[:1]:
        raise BadInput(f"{bad}: layer-wise distributed optimizer state is not supported")
    if (d / "optim.pt").exists() or (d / "model_rng.pt").exists():
        raise BadInput(f"{d}: pre-2023 distributed optimizer layout (per-DP optim.pt) is not supported")
    if "optimizer" not in sd:
        return None
    opt = sd["optimizer"]
    first = next((o for o in opt if o is not None), None) if isinstance(opt, list) else opt
    if not isinstance(first, dict):
        raise BadInput(f"{model_path}: 'optimizer' is a {type(first).__name__}, not a state dict")
    n = len(opt) if isinstance(opt, list) else 1
    if "param_state" in first or "param_state_sharding_type" in first:
        raise BadInput(f"{model_path}: optimizer state in a torch_dist layout inside a legacy file is not supported")
    if "state" in first and "param_groups" in first:
        return {"kind": "adam", "variant": "fp32", "subs": n}
    inner = first.get("optimizer")
    if not isinstance(inner, dict) or "param_groups" not in inner:
        raise BadInput(f"{model_path}: unrecognised 'optimizer' entry (keys {sorted(map(str, first))[:6]})")
    if "state" in inner:
        if "fp32_from_fp16_params" not in first:
            raise BadInput(f"{model_path}: mixed-precision optimizer state without fp32_from_fp16_params")
        return {"kind": "adam", "variant": "float16", "subs": n}
    if not (d / DIST_FILE).is_file():
        raise BadInput(f"missing {d / DIST_FILE}: the optimizer key says distributed optimizer")
    return {"kind": "distributed", "variant": "distributed", "subs": n}
