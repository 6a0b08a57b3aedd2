#!/usr/bin/env bash
# Train every shipped model on a lent GPU in about 7 minutes and bring the results back in one file.
#
# Run from the repository root, with the training packs carried in .device_data/ (built here by
# `python recipes/train_recipes.py all --pack-to .device_data`; they hold the Wald-reduced pairs,
# so the GPU machine needs neither rasterio nor the shared data):
#
#     OUT=/some/dir bash scripts/device_train.sh
#
# Environment: DEVICE (default cuda), PY (python3), PACKS (.device_data), RECIPES (the four shipped
# models), MAX_SECONDS (one training budget for every recipe, e.g. 20 for a CPU smoke test; default:
# each recipe's GPU budget, 200 + 40 + 50 + 50 s), DIM (override every width, for smoke tests),
# SMOKE=1 (tiny batches and test crops). CPU smoke test:
#     DEVICE=cpu MAX_SECONDS=5 DIM=4 SMOKE=1 PY=.venv/bin/python OUT=/tmp/dev bash scripts/device_train.sh Writes $OUT/fusion_weights.tar.gz (weights,
# cards, logs, loss curves), $OUT/summary.jsonl and $OUT/device_train.log.
set -uo pipefail

OUT=${OUT:-out/device}
DEVICE=${DEVICE:-cuda}
PY=${PY:-python3}
PACKS=${PACKS:-.device_data}
RECIPES=${RECIPES:-"landsat hyperion_pan hyperion_hisr vhr4"}
mkdir -p "$OUT"
LOG="$OUT/device_train.log"
STAGE=$(mktemp -d)

export PYTHONUNBUFFERED=1
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
[ -d /tmp/site ] && export PYTHONPATH="/tmp/site:$PYTHONPATH"

{
  echo "== $(date -u +%FT%TZ) device_train.sh on $(hostname)"
  command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  "$PY" -c "import sys, torch; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.cuda.is_available())"
  ls -l "$PACKS"
} 2>&1 | tee "$LOG"

BUDGET=()
[ -n "${MAX_SECONDS:-}" ] && BUDGET+=(--max-seconds "$MAX_SECONDS")
[ -n "${DIM:-}" ] && BUDGET+=(--dim "$DIM")
# SMOKE=1: a tiny batch and test crops, so a CPU run checks every code path in a few minutes.
[ -n "${SMOKE:-}" ] && BUDGET+=(--batch 2 --test-crop 48 --val-crop 24)
T0=$(date +%s)
status=0
for name in $RECIPES; do
  t=$(date +%s)
  echo "== $name: start $(date -u +%T)" | tee -a "$LOG"
  # One recipe failing must not cost the others their turn.
  if "$PY" recipes/train_recipes.py "$name" --device "$DEVICE" --from-pack "$PACKS" \
      --out "$STAGE/weights" --work "$STAGE/runs" --quiet "${BUDGET[@]}" \
      > >(tee -a "$OUT/summary.jsonl") 2> >(tee -a "$LOG" >&2); then
    echo "== $name: done in $(( $(date +%s) - t )) s" | tee -a "$LOG"
  else
    status=1
    echo "== $name: FAILED after $(( $(date +%s) - t )) s" | tee -a "$LOG"
  fi
done
echo "== all recipes: $(( $(date +%s) - T0 )) s" | tee -a "$LOG"

# checkpoint.pt files stay behind: the exported safetensors + cards are what ships.
tar -C "$STAGE" -czf "$OUT/fusion_weights.tar.gz" --exclude='checkpoint.pt' weights runs 2>>"$LOG"
ls -l "$OUT" | tee -a "$LOG"
rm -rf "$STAGE"
exit $status
