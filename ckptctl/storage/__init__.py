"""Storage and processes: the Zarr pivot's helpers, safe pickling, atomic commits, progress (below the formats)."""
