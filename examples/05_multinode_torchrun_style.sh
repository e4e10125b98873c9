#!/usr/bin/env bash
# Several nodes without Slurm: run this script on EVERY node, with torchrun's usual variables.
#
#   node 0:  NNODES=2 NODE_RANK=0 MASTER_ADDR=node0 MASTER_PORT=29555 bash examples/05_multinode_torchrun_style.sh SRC DST tp8pp4
#   node 1:  NNODES=2 NODE_RANK=1 MASTER_ADDR=node0 MASTER_PORT=29555 bash examples/05_multinode_torchrun_style.sh SRC DST tp8pp4
#
# ckptctl itself starts `torchrun --nnodes $NNODES --node-rank $NODE_RANK` with static rendezvous at
# MASTER_ADDR:MASTER_PORT: do not wrap it in torchrun. SRC and DST's parent on a shared filesystem.
set -euo pipefail
SRC=$1 DST=$2 TO=$3
: "${NNODES:?set NNODES}" "${NODE_RANK:?set NODE_RANK}" "${MASTER_ADDR:?set MASTER_ADDR}"
MASTER_PORT=${MASTER_PORT:-29555}
NPROC=${NPROC:-$(nproc)}

ckptctl convert "$SRC" "$DST" --to "$TO" --nproc "$NPROC" \
    --nnodes "$NNODES" --node-rank "$NODE_RANK" --master-addr "$MASTER_ADDR" --master-port "$MASTER_PORT"

# Node 0 commits DST after every node's workers passed the last barrier; verify there.
if [ "$NODE_RANK" = 0 ]; then
    ckptctl verify "$SRC" "$DST"
fi
