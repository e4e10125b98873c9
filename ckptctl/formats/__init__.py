"""Checkpoint formats as plug-ins: `base` (the interface every format implements), `registry` (finds the
format packages), `megatron` (conventions Megatron-LM's formats share), one package per format.

Only modules under `ckptctl/formats/` may name a format; everything else asks the registry.
"""
from __future__ import annotations
