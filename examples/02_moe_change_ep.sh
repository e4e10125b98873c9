#!/usr/bin/env bash
# MoE: change expert parallelism. EP4 (one expert per EP rank, 4 experts) -> TP2 EP2 ETP1 (two experts
# per EP rank, expert weights not split over TP), verified byte-identical.
#
#   bash examples/02_moe_change_ep.sh [SRC]
#
# Layout names: tp2pp1ep2etp1 = TP 2, PP 1, EP 2, ETP 1 (ETP defaults to TP when left out).
# Parts may come in any order (ep2tp2etp1 is the same); the DP size follows from the expert grid.
set -euo pipefail
WORK=${WORK:-$(mktemp -d)}
SRC=${1:-$WORK/moe_ep4}

if [ ! -e "$SRC" ]; then
    ckptctl example moe --layout tp1pp1ep4 --layers 2 --experts 4 --out "$SRC"
fi
ckptctl inspect "$SRC"

# EP4 -> TP2 EP2 ETP1: the dense part is split over TP, experts regrouped over EP, expert weights kept
# whole per ETP rank. The optimizer's expert sub-optimizer is rebuilt for the target.
ckptctl convert "$SRC" "$WORK/moe_tp2ep2etp1" --to tp2pp1ep2etp1 --nproc 2
ckptctl verify "$SRC" "$WORK/moe_tp2ep2etp1"
