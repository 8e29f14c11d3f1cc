#!/bin/bash
# Issue 20: the generic recipe's defaults on every kind of subset (2 cores: about 20 minutes).
#   bash bench/generic_defaults.sh > bench/results/generic_defaults.txt
# For each subset: train with the generic recipe and nothing else (it ends with the circuit's
# bit-width, stability and encrypted latency), the same recipe without pruning (validation
# accuracy only), and simulate against encrypt on 200 test images. The RGB multi-class,
# multi-label and ordinal files are generated from the real ones (bench/generated_subsets.py).
set -u
cd "$(dirname "$0")/.."
REAL=${MEDMNIST_DIR:-$(cd .. && pwd)/shared/data/medmnist}
WORK=$(mktemp -d)
export ENGINE_MODELS_DIR=$WORK/models ENGINE_CACHE_DIR=$WORK/cache
MEDMNIST_DIR=$REAL python bench/generated_subsets.py "$WORK/generated" >/dev/null
for D in breastmnist pneumoniamnist bloodmnist chestmnist retinamnist; do
  case $D in pneumoniamnist|breastmnist) export MEDMNIST_DIR=$REAL;; *) export MEDMNIST_DIR=$WORK/generated;; esac
  echo "=== $D"
  python -m engine train --dataset $D --recipe generic --name generic 2>/dev/null
  echo "--- without pruning"
  python -m engine train --dataset $D --recipe generic --max-active-inputs 0 --name noprune --no-circuit-check 2>/dev/null | grep "val accuracy"
  echo "--- simulate against encrypt, 200 test images"
  python -m engine evaluate --dataset $D --model generic --modes simulate,fhe --limit 200 2>/dev/null | tail -6
done
rm -rf "$WORK"
