"""Stand-in `mamba_ssm.ops.triton.ssd_combined`: the scan entry points exist but cannot run."""


def mamba_chunk_scan_combined(*args, **kwargs):  # pragma: no cover - never run on CPU
    raise NotImplementedError("stand-in mamba_ssm: no chunk scan kernel on CPU")


def mamba_split_conv1d_scan_combined(*args, **kwargs):  # pragma: no cover - never run on CPU
    raise NotImplementedError("stand-in mamba_ssm: no fused split/conv1d/scan kernel on CPU")
