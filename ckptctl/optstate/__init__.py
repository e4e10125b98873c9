"""Optimizer state without a file format (DESIGN §6): which tensors are parameters and how megatron-core
groups them (`params`), the distributed optimizer's flat buffers (`buffers`, `flat`), the sub-optimizer
structure (`subopt`), per-file decoding context and store planning (`state`), the parameter order derived
from the model (`order`) and the master==weight invariant (`check`). The codecs that read and write these
in a file live with their format (`ckptctl.formats.<name>`).

Every trainable parameter's state becomes store arrays `optim/{param,exp_avg,exp_avg_sq}/<model array>`
(fp32), split exactly like the weight: the weight's `Piece`s with the array name mapped (`optim_piece`),
so no sharding rule is written twice and vocab padding rows follow the weight rows (rows the target adds
are zero, rows it drops are dropped).
"""
