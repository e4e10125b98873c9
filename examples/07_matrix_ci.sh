#!/usr/bin/env bash
# A CI job: sweep layout pairs (make a source, convert, verify, and back) and fail the job on any miss.
#
#   bash examples/07_matrix_ci.sh            # a quick sweep
#   MODEL=all bash examples/07_matrix_ci.sh  # Megatron's own test pairs for every family (minutes)
#
# In GitHub Actions:
#   - run: pip install -e . && bash examples/07_matrix_ci.sh
#   - uses: actions/upload-artifact@v4
#     with: {name: ckptctl-matrix, path: matrix.json}
set -euo pipefail
OUT=${OUT:-matrix.json}
if [ "${MODEL:-}" = "all" ]; then
    ckptctl matrix --model all --json > "$OUT"
else
    ckptctl matrix --model gpt --pairs "${PAIRS:-tp2pp2:tp1pp1,tp1pp1:pp2tp2}" --nproc 2 --json > "$OUT"
fi
# matrix exits 1 when a pair fails (set -e stops here); the JSON names the failing pair and why.
python3 -c "import json,sys; d=json.load(open(sys.argv[1])); print('matrix:', sum(r['result']=='pass' for r in d['pairs']), 'of', len(d['pairs']), 'pairs pass')" "$OUT"
