"""ckptctl: move Megatron checkpoints between parallel layouts, bitwise, through a Zarr pivot."""
__version__ = "0.1.0"
