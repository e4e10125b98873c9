"""A stand-in for the `mamba_ssm` package so that megatron-core 0.19.2 can *build* Mamba layers on a CPU.

Only construction is supported: the gated RMSNorm is a real module with the real parameter names and
shapes (so state dicts match those of real runs); the scan kernels raise when called. Tests put
`tests/mcore/standin` on `sys.path` in the worker processes only.
"""
__version__ = "0.0.0+standin"
