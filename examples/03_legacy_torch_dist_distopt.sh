#!/usr/bin/env bash
# Legacy `torch` format <-> megatron-core `torch_dist`, with the distributed optimizer, changing DP.
#
#   bash examples/03_legacy_torch_dist_distopt.sh [SRC]
#
# SRC: a legacy checkpoint saved with --use-distributed-optimizer (distrib_optim.pt beside each
# model_optim_rng.pt). Without it, a small one is made at TP2 DP2.
set -euo pipefail
WORK=${WORK:-$(mktemp -d)}
SRC=${1:-$WORK/legacy_tp2dp2}

if [ ! -e "$SRC" ]; then
    ckptctl example gpt --layout tp2pp1dp2 --layers 2 --optimizer distributed --out "$SRC"
fi

# torch -> torch_dist at TP1 DP4. The optimizer state is written as megatron-core saves it
# (dp_reshardable by default; --optim-sharding fully_reshardable for the other form).
ckptctl convert "$SRC" "$WORK/dist_tp1dp4" --to tp1dp4 --to-format torch_dist --nproc 2
ckptctl inspect "$WORK/dist_tp1dp4"

# ... and back to the legacy format (Megatron's name for it, `torch`, works too), at the source's layout.
ckptctl convert "$WORK/dist_tp1dp4" "$WORK/legacy_again" --to tp2dp2 --to-format torch --nproc 2

# Both are the same checkpoint as the source, byte for byte (verify reads any format, any layout).
ckptctl verify "$SRC" "$WORK/dist_tp1dp4"
ckptctl verify "$SRC" "$WORK/legacy_again"
