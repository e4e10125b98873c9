"""Run megatron-core 0.19.2 on a CPU-only torch with gloo (see shared/MCORE_ON_CPU.md), and the pieces
every oracle harness shares: Megatron-LM's legacy save tail, raw-byte comparison, the result writer.

Call `patch_cuda_for_cpu()` in torchrun worker processes only (never in the pytest process), then
`init_parallel(...)`.
"""
from __future__ import annotations

import copy
import json
import os
import warnings

import torch

_PATCHED = False


def patch_cuda_for_cpu() -> None:
    """Redirect the few CUDA calls megatron-core makes on the paths we use to the CPU."""
    global _PATCHED
    if _PATCHED:
        return
    warnings.filterwarnings("ignore")
    torch.cuda.current_device = lambda: torch.device("cpu")
    torch.cuda.synchronize = lambda *a, **k: None
    torch.cuda.is_available = lambda: False
    torch.Tensor.cuda = lambda self, *a, **k: self           # tied-embedding all-reduce across PP

    from megatron.core import utils

    def get_tensor(self, tensor_shape, dtype, name, mem_alloc_context=None):
        return torch.empty(tuple(tensor_shape), dtype=dtype)

    utils.GlobalMemoryBuffer.get_tensor = get_tensor

    # TP>1 with EP>1 forces sequence parallelism; the torch norm refuses it only because it cannot tag
    # grads for the SP all-reduce (irrelevant here): give the norm a config copy with it off.
    from megatron.core.transformer import torch_norm
    norm_new = torch_norm.WrappedTorchNorm.__new__

    def new(cls, config, *a, **k):
        if config.sequence_parallel:
            config = copy.copy(config)
            config.sequence_parallel = False
        return norm_new(cls, config, *a, **k)

    torch_norm.WrappedTorchNorm.__new__ = new
    _PATCHED = True


cpu_patches = patch_cuda_for_cpu      # the name tests/mcore/moe.py and torch_dist.py used


def init_parallel(tp: int = 1, pp: int = 1, vpp: int | None = None, ep: int = 1, etp: int | None = None,
                  seed: int = 1234) -> None:
    """gloo process group from the torchrun environment, then megatron-core's parallel state."""
    from megatron.core import parallel_state as ps
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

    if not torch.distributed.is_initialized():
        torch.distributed.init_process_group(
            "gloo", rank=int(os.environ["RANK"]), world_size=int(os.environ["WORLD_SIZE"]))
    if ps.model_parallel_is_initialized():
        ps.destroy_model_parallel()
    ps.initialize_model_parallel(
        tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
        virtual_pipeline_model_parallel_size=vpp if vpp and vpp > 1 else None,
        expert_model_parallel_size=ep, expert_tensor_parallel_size=etp)
    model_parallel_cuda_manual_seed(seed, inference_rng_tracker=True)


# ----------------------------------------------------------------------------- Megatron-LM legacy files

def rank_dirname() -> str:
    """Megatron-LM's get_checkpoint_name directory for this rank: mp_rank_TT[_PPP][_EEE]."""
    from megatron.core import parallel_state as ps
    name = f"mp_rank_{ps.get_tensor_model_parallel_rank():02d}"
    if ps.get_pipeline_model_parallel_world_size() > 1:
        name += f"_{ps.get_pipeline_model_parallel_rank():03d}"
    if ps.get_expert_model_parallel_world_size() > 1:
        name += f"_{ps.get_expert_model_parallel_rank():03d}"
    return name


def legacy_file(root: str, iteration: int) -> str:
    return os.path.join(root, f"iter_{iteration:07d}", rank_dirname(), "model_optim_rng.pt")


def is_legacy_writer() -> bool:
    """Megatron-LM core_v0.19.0 save_checkpoint: DP rank 0 or expert-DP rank 0 writes its rank file."""
    from megatron.core import parallel_state as ps
    return ps.get_data_parallel_rank() == 0 or ps.get_expert_data_parallel_rank() == 0


def save_legacy(root: str, iteration: int, state) -> None:
    """Megatron-LM's legacy save tail; every rank calls it. `state`: this rank's file contents (a dict, or a
    callable giving it, so that non-writers build nothing), written only where `is_legacy_writer()`; then
    rank 0 writes the tracker."""
    if is_legacy_writer():
        path = legacy_file(root, iteration)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        torch.save(state() if callable(state) else state, path)
    torch.distributed.barrier()
    if torch.distributed.get_rank() == 0:
        with open(os.path.join(root, "latest_checkpointed_iteration.txt"), "w") as f:
            f.write(str(iteration))
    torch.distributed.barrier()


# ----------------------------------------------------------------------------- comparing and reporting

def raw(t: torch.Tensor) -> bytes:
    t = t.detach().contiguous().reshape(-1)
    return t.view(torch.uint8).numpy().tobytes() if t.numel() else b""


def compare_state(got: dict, exp: dict) -> tuple[list, list]:
    """(mismatching keys with the reason, non-tensor keys) of two state dicts: dtype, shape, raw bytes."""
    bad, other = [], []
    for k in sorted(set(got) | set(exp)):
        if k not in got or k not in exp:
            bad.append(f"{k}: only in {'expected' if k in exp else 'got'}")
            continue
        g, e = got[k], exp[k]
        if not (torch.is_tensor(g) and torch.is_tensor(e)):
            if torch.is_tensor(g) or torch.is_tensor(e):
                bad.append(f"{k}: tensor vs {type(e if torch.is_tensor(g) else g).__name__}")
            else:
                other.append(k)
            continue
        if g.dtype != e.dtype or tuple(g.shape) != tuple(e.shape):
            bad.append(f"{k}: {g.dtype}{tuple(g.shape)} != expected {e.dtype}{tuple(e.shape)}")
        elif raw(g) != raw(e):
            bad.append(f"{k}: bytes differ")
    return bad, other


def gather(obj) -> list:
    """Every rank's `obj`, in rank order, on every rank."""
    out = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(out, obj)
    return out


def write_result(path: str, result, ok: bool = True, what: str = "") -> None:
    """Rank 0 writes the (gathered) result as JSON; a failed check also says so on stderr."""
    if torch.distributed.get_rank() != 0:
        return
    with open(path, "w") as f:
        json.dump(result, f, indent=1, default=str)
    if not ok:
        import sys
        print(f"{what}: MISMATCH, see {path}", file=sys.stderr)


# ----------------------------------------------------------------------------- Megatron-LM torch_dist files

def dist_metadata() -> dict:
    """The sharded-state-dict metadata Megatron-LM core_v0.19.0 passes (and saves, less the group)."""
    from megatron.core import parallel_state as ps
    return {"singleton_local_shards": False, "chained_optim_avoid_prefix": True,
            "dp_cp_group": ps.get_data_parallel_group(with_context_parallel=True)}


def save_dist(root: str, iteration: int, state: dict) -> None:
    """Megatron-LM's torch_dist save: `state` ({"args", "iteration", "model": sharded state dict, ...})
    into root/iter_XXXXXXX with the content metadata, then rank 0 writes the tracker. Every rank calls it."""
    from megatron.core import dist_checkpointing
    it = os.path.join(root, f"iter_{iteration:07d}")
    if torch.distributed.get_rank() == 0:
        os.makedirs(it, exist_ok=True)
    torch.distributed.barrier()
    dist_checkpointing.save(state, it, content_metadata={
        k: v for k, v in dist_metadata().items() if k != "dp_cp_group"})
    if torch.distributed.get_rank() == 0:
        with open(os.path.join(root, "latest_checkpointed_iteration.txt"), "w") as f:
            f.write(str(iteration))
    torch.distributed.barrier()


def load_dist(model, root: str, iteration: int) -> None:
    """megatron-core's own load of a torch_dist checkpoint into `model` (every key requested and present,
    then a strict load_state_dict)."""
    from megatron.core import dist_checkpointing
    loaded = dist_checkpointing.load({"model": model.sharded_state_dict(metadata=dist_metadata())},
                                     os.path.join(root, f"iter_{iteration:07d}"), strict="raise_all")
    model.load_state_dict(loaded["model"], strict=True)


def check_converted(model, path: str, fmt: str, iteration: int, expected: dict) -> dict:
    """Load ckptctl's output at `path` into `model` as Megatron-LM would (legacy: this rank's file with a
    strict load_state_dict; torch_dist: `load_dist`) and compare its tensors' raw bytes with `expected`.
    Returns {"mismatch": [...], "strict_load": "ok" or the error}."""
    r = {"mismatch": []}
    try:
        if fmt == "legacy":
            sd = torch.load(legacy_file(path, iteration), map_location="cpu", weights_only=False)["model"]
            r["mismatch"] += compare_state(sd, expected)[0]
            model.load_state_dict(sd, strict=True)
        else:
            load_dist(model, path, iteration)
            r["mismatch"] += compare_state(model.state_dict_for_save_checkpoint(), expected)[0]
        r["strict_load"] = "ok"
    except Exception as e:  # noqa: BLE001 - reported, the test fails on it
        r["strict_load"] = str(e)[:300]
    return r


def run_command(argv: list[str], commands: dict, setup=()) -> None:
    """`<script> CMD ARGS...` under torchrun: the CPU patches and `setup` callables, one gloo group,
    then commands[CMD](*ARGS); the group is torn down after a last barrier even when CMD fails."""
    patch_cuda_for_cpu()
    for f in setup:
        f()
    if not torch.distributed.is_initialized():
        torch.distributed.init_process_group("gloo")
    try:
        commands[argv[0]](*argv[1:])
        torch.distributed.barrier()      # no rank leaves while a peer still reads what it wrote
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


# ----------------------------------------------------------------------------- one training step

def train_step(models: list, opt, cfg: dict, tokens: torch.Tensor, labels: torch.Tensor, lr: float) -> None:
    """One optimizer step of DDP-wrapped GPT `models` (one chunk per rank, any PP) on this DP rank's
    (tokens, labels): forward/backward through the pipeline with blocking send/recv (one microbatch),
    megatron-core's `finalize_model_grads` (DP reduction, embedding grads across stages), every group's
    lr set to `lr`, `opt.step()`. The one step rule of the optimizer oracles (optim.py, torch_dist_optim.py)."""
    from megatron.core import parallel_state as ps
    from megatron.core.distributed.finalize_model_grads import finalize_model_grads
    from megatron.core.utils import get_attr_wrapped_model

    assert len(models) == 1, "one model chunk per rank (no virtual pipeline)"
    b, s = tokens.shape
    pos = torch.arange(s).unsqueeze(0).expand(b, s).contiguous()
    mask = torch.triu(torch.ones(s, s, dtype=torch.bool), diagonal=1)[None, None]
    model = models[0]
    first, last = ps.is_pipeline_first_stage(), ps.is_pipeline_last_stage()
    model.zero_grad_buffer()
    opt.zero_grad()
    inp = None
    if not first:      # the previous stage's hidden states [s, b, h] in the pipeline dtype
        conf = get_attr_wrapped_model(model, "config")
        inp = torch.empty((s, b, cfg["hidden_size"]), dtype=conf.pipeline_dtype, requires_grad=True)
        torch.distributed.recv(inp.data, src=ps.get_pipeline_model_parallel_prev_rank())
        get_attr_wrapped_model(model, "set_input_tensor")(inp)
    out = model(tokens, pos, mask)
    if last:
        logits = out[..., : cfg["vocab_size"]].float()
        torch.nn.functional.cross_entropy(logits.reshape(-1, cfg["vocab_size"]), labels.reshape(-1)).backward()
    else:
        torch.distributed.send(out.detach().contiguous(), dst=ps.get_pipeline_model_parallel_next_rank())
        grad = torch.empty_like(out)
        torch.distributed.recv(grad, src=ps.get_pipeline_model_parallel_next_rank())
        out.backward(grad)
    if inp is not None:
        torch.distributed.send(inp.grad.contiguous(), dst=ps.get_pipeline_model_parallel_prev_rank())
    finalize_model_grads(models)
    for g in opt.param_groups:
        g["lr"] = lr
    ok, _, _ = opt.step()
    assert ok, "optimizer step skipped"
