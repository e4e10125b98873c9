"""Stand-in `mamba_ssm.ops.triton.layernorm_gated`: the gated RMSNorm's parameters, no kernel."""
import torch
from torch import nn


class RMSNorm(nn.Module):
    """Parameters as mamba_ssm's RMSNorm: `weight` (hidden_size,) initialised to ones, no bias."""

    def __init__(self, hidden_size, eps=1e-5, group_size=None, norm_before_gate=True, device=None, dtype=None):
        super().__init__()
        self.eps, self.group_size, self.norm_before_gate = eps, group_size, norm_before_gate
        self.weight = nn.Parameter(torch.empty(hidden_size, device=device, dtype=dtype))
        self.register_parameter("bias", None)
        nn.init.ones_(self.weight)

    def forward(self, x, z=None):  # pragma: no cover - never run on CPU
        raise NotImplementedError("stand-in mamba_ssm: no gated RMSNorm kernel on CPU")
