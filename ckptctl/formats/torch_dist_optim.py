"""Stage-1 re-export of `ckptctl.formats.torch_dist.optim_*` for callers not yet moved (removed with them)."""
from ckptctl.formats.torch_dist.optim_info import *  # noqa: F401,F403
from ckptctl.formats.torch_dist.optim_info import form_text, check_sharding  # noqa: F401
