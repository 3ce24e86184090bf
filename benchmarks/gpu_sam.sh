#!/usr/bin/env bash
# The paper's FM-SAM and SAM2 numbers (plus fm_prompt and sam2_auto refinement) on a GPU machine.
#
#   CKPT=/path/to/checkpoints DATA=../shared/data/defects benchmarks/gpu_sam.sh
#
# CKPT holds the released weights (not shipped, never downloaded by fdseg):
#   FastSAM-x.pt (or set FASTSAM=FastSAM-s.pt), sam2.1_hiera_large.pt (or set SAM2=sam2.1_hiera_tiny.pt ...);
#   the SAM2 config is taken from sam2's own configs by the checkpoint's name (or set SAM2_CONFIG).
# Needs the sam extra in a CUDA torch venv:  python -m venv .venv-sam && .venv-sam/bin/pip install
#   torch==2.14.1 torchvision==0.29.1 && .venv-sam/bin/pip install -e '.[dev,sam]'
# Every run uses the same episodes (seed 2); rerunning resumes. Results: $OUT/*/results.md
set -euo pipefail
cd "$(dirname "$0")/.."
: "${CKPT:?set CKPT to the folder with the FastSAM / SAM2 checkpoints}"
DATA=${DATA:-../shared/data/defects}
OUT=${OUT:-bench-sam}
FDSEG=${FDSEG:-.venv-sam/bin/fdseg}
FASTSAM=${FASTSAM:-FastSAM-x.pt}
SAM2=${SAM2:-sam2.1_hiera_large.pt}
DEVICE=${DEVICE:-cuda}
SAM2_ARGS=(--sam2-checkpoint "$CKPT/$SAM2")
[ -n "${SAM2_CONFIG:-}" ] && SAM2_ARGS+=(--sam2-config "$SAM2_CONFIG")
COMMON=(--data "$DATA" --shots 1 5 --device "$DEVICE" --gallery 3)

"$FDSEG" bench "${COMMON[@]}" --method fm --out "$OUT/fm"
"$FDSEG" bench "${COMMON[@]}" --method fm --refine superpixel --out "$OUT/fm_superpixel"
"$FDSEG" bench "${COMMON[@]}" --method fm --refine fastsam --fastsam-checkpoint "$CKPT/$FASTSAM" --out "$OUT/fm_fastsam"
"$FDSEG" bench "${COMMON[@]}" --method fm --refine sam2_auto "${SAM2_ARGS[@]}" --out "$OUT/fm_sam2_auto"
"$FDSEG" bench "${COMMON[@]}" --method sam2_track fm_prompt "${SAM2_ARGS[@]}" --out "$OUT/sam2"
for d in fm fm_superpixel fm_fastsam fm_sam2_auto sam2; do echo "== $d"; cat "$OUT/$d/results.md"; done
