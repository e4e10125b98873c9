#!/usr/bin/env bash
# Convert through a kept store: read the source once, write several target layouts from it.
#
#   bash examples/06_through_kept_store.sh [SRC]
#
# The store (Zarr, one array per global tensor) is layout-free: keep it when you will want other
# layouts later (e.g. TP4 for training and TP1 for evaluation), or to move the source phase and the
# target phase to different machines.
set -euo pipefail
WORK=${WORK:-$(mktemp -d)}
SRC=${1:-$WORK/src}

if [ ! -e "$SRC" ]; then
    ckptctl example gpt --layout tp2pp2 --layers 4 --out "$SRC"
fi

# Source phase only: a destination ending in .zarr and no --to.
ckptctl convert "$SRC" "$WORK/ckpt.zarr" --nproc 2
ckptctl inspect "$WORK/ckpt.zarr"

# Target phases from the store (the source is not read again): one command per layout you need.
for TO in ${TARGETS:-tp1pp1 tp4pp1}; do
    ckptctl convert "$WORK/ckpt.zarr" "$WORK/$TO" --to "$TO" --nproc 2
    ckptctl verify "$SRC" "$WORK/$TO"
done
# (In one command: ckptctl convert SRC DST --to tp4pp1 --keep-store  keeps DST.zarr beside DST.)
