"""Run megatron-core 0.19.2 on a CPU-only torch with gloo (see shared/MCORE_ON_CPU.md).

Call `patch_cuda_for_cpu()` in torchrun worker processes only (never in the pytest process), then
`init_parallel(...)`.
"""
from __future__ import annotations

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
    _PATCHED = True


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
