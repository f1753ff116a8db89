#!/usr/bin/env bash
# Regenerates the measured sections of docs/model-card.md for one checkpoint: per-source, calibration and
# operating-point tables on faces256 Test and dfdc224 Test (`dfmod evaluate --model-card`), and the whole-photo
# evaluation of the face stage (`dfmod evaluate-faces`, figures printed). Reports go to OUT.
#
#   bash scripts/model_card.sh DATASETS_DIR [CHECKPOINT] [OUT]
#
# DATASETS_DIR holds faces256/ and dfdc224/; CHECKPOINT defaults to the shipped model. About 5 minutes on 2
# idle CPU cores (the whole-photo part dominates: MTCNN on 1,205 composites of up to 2400 px).
# The leave-one-source-out table has its own command (it trains): see docs/model-card.md.
set -euo pipefail
cd "$(dirname "$0")/.."
DATASETS=${1:?usage: bash scripts/model_card.sh DATASETS_DIR [CHECKPOINT] [OUT]}
CHECKPOINT=${2:-}
OUT=${3:-runs/model-card}
DFMOD=${DFMOD:-.venv/bin/dfmod}
args=()
if [[ -n "$CHECKPOINT" ]]; then args=(--checkpoint "$CHECKPOINT"); fi
for set in faces256 dfdc224; do
  "$DFMOD" evaluate "$DATASETS/$set/Test" "${args[@]}" --report "$OUT/$set" --no-progress \
    --model-card docs/model-card.md
done
"$DFMOD" evaluate-faces "$DATASETS/faces256/Test" "${args[@]}" --report "$OUT/whole-photos"
