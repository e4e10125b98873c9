#!/usr/bin/env bash
# Single node: look at a checkpoint, plan the conversion, convert TP2PP2 -> TP4PP1, prove it bit for bit.
#
#   bash examples/01_convert_and_verify.sh [SRC]
#
# SRC: your Megatron-LM checkpoint folder (the one holding latest_checkpointed_iteration.txt).
# Without it, a small random GPT checkpoint is made first. Outputs go to $WORK (default: a temp folder).
set -euo pipefail
WORK=${WORK:-$(mktemp -d)}
SRC=${1:-$WORK/src}
DST=$WORK/dst_tp4pp1

if [ ! -e "$SRC" ]; then
    ckptctl example gpt --layout tp2pp2 --layers 4 --out "$SRC"
fi

# 1. What is it? Family, format, layout, iteration, optimizer, bytes (reads metadata only).
ckptctl inspect "$SRC"

# 2. The plan: files, bytes per filesystem against free space, workers, memory, what happens to
#    optimizer / RNG / scheduler state. Writes nothing; refuses what the real run would refuse.
ckptctl convert "$SRC" "$DST" --to tp4pp1 --dry-run

# 3. Convert. Workers default to the cores (at most 8); --max-memory caps each worker's RSS.
#    The result appears only when complete (written beside DST, renamed into place).
ckptctl convert "$SRC" "$DST" --to tp4pp1 --nproc 2

# 4. Prove it: every global tensor (weights and optimizer state) gathered from both sides' rank
#    files and compared as raw bytes. Exit 0 equal, 1 different.
ckptctl verify "$SRC" "$DST"
