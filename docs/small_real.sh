#!/usr/bin/env bash
# DiNO-Diffusion end to end on real chest X-rays, on a CPU: the recipe behind docs/results.md.
#
#   bash docs/small_real.sh          # from the repository root, with ../shared/data beside it; ~70 min on 2 cores
#
# 1. train.py --preset small-real: 128 px, random-init models (VAE fitted first, frozen ViT, 6M-param UNet),
#    the 243 unlabelled CXRs of ../shared/data/cxr-unlabeled with 60 held out by patient; FID every 500 steps
# 2. sample.py: reconstruction and interpolation grids from held-out images (run/val.csv)
# 3. segment.py: DiffSeg on the 74 lung-masked CXRs of ../shared/data/cxr-lungs (never seen in training),
#    Dice against the image-blind baselines, with a small search over timestep and merge threshold
# 4. classify.py on phantom labels: the tiny preset trained on phantoms, 3 synthetic reconstructions per real
#    image, a tiny DenseNet at 64 px (lr 3e-3), regimes 50, 100, 200, ratios 1:0, 1:1, 1:3, 3 folds
# 5. python -m docs.report: figures and tables in $OUT/report (docs/results/ holds the committed ones)
#
# Environment overrides (tests/test_small_real.py runs the recipe with a handful of steps): PYTHON, OUT,
# DATA (../shared/data), and extra flags for each step: TRAIN_ARGS, TINY_ARGS, SAMPLE_ARGS, SEGMENT_ARGS,
# CLASSIFY_ARGS; PHANTOMS (number of labelled phantoms, 300).
set -euo pipefail
PY=${PYTHON:-python}
OUT=${OUT:-runs}
DATA=${DATA:-../shared/data}
RUN=$OUT/small-real

$PY train.py --preset small-real --data "$DATA/cxr-unlabeled/index.csv" --out "$RUN" ${TRAIN_ARGS:-}

$PY sample.py --run "$RUN" --mode reconstruction --images "$RUN/val.csv" --limit 8 --num 4 \
    --out "$OUT/small-real-reconstruction" ${SAMPLE_ARGS:-}
$PY sample.py --run "$RUN" --mode interpolation --images "$RUN/val.csv" --num-pairs 6 --num 5 \
    --ratios 0,0.25,0.5,0.75,1 --method slerp --out "$OUT/small-real-interpolation" ${SAMPLE_ARGS:-}

# DiffSeg at the paper's t = 300 with KL threshold 0.001, the value docs/results.md reports: this small model's
# attention maps are smooth, so 0.05 (for SD-size models) merges every anchor into one segment. segment.py's
# default is now --threshold auto (diffseg.py), measured on the tiny preset; the search below includes
# it so that the next run of this recipe compares it with the fixed values. The search selects on
# the evaluated images themselves, so its best row is optimistic. Read the Dice next to the image-blind
# baselines in the same summary (docs/results.md explains why).
$PY segment.py --run "$RUN" --images "$DATA/cxr-lungs/index.csv" --out "$OUT/small-real-segment" \
    --threshold 0.001 ${SEGMENT_ARGS:-}
$PY segment.py --run "$RUN" --images "$DATA/cxr-lungs/index.csv" --out "$OUT/small-real-segment-search" \
    --search timestep=50,300,700 threshold=auto,0.0001,0.0003,0.001,0.003,0.05 grid=8,16 ${SEGMENT_ARGS:-}

$PY train.py --preset tiny --out "$OUT/tiny" ${TINY_ARGS:-}
$PY -m data.phantom --out "$OUT/phantoms" -n "${PHANTOMS:-300}" --size 64 --seed 1000000
$PY sample.py --run "$OUT/tiny" --mode reconstruction --images "$OUT/phantoms/labels.csv" --num 3 --steps 20 \
    --out "$OUT/tiny-synthetic" ${SAMPLE_ARGS:-}
$PY classify.py --real "$OUT/phantoms/labels.csv" --synthetic "$OUT/tiny-synthetic/synthetic.csv" \
    --model tiny --image-size 64 --regimes 50,100,200 --ratios 0,1,3 --folds 3 --lr 3e-3 --batch-size 16 \
    --max-epochs 30 --early-stop 8 \
    --num-workers 0 --out "$OUT/classify" ${CLASSIFY_ARGS:-}

$PY -m docs.report --runs "$OUT" --data "$DATA" --out "$OUT/report"
