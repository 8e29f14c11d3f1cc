#!/bin/bash
# Issue 31: `train --quick-search` with the generic recipe on a subset without a search, then simulate
# against encrypt on 200 test images (2 cores: about 10 minutes for the generated RGB file).
#   bash bench/quick_search.sh bloodmnist > bench/results/quick_search_bloodmnist.txt
# The RGB multi-class, multi-label and ordinal files are generated from the real ones (bench/generated_subsets.py).
set -u
cd "$(dirname "$0")/.."
D=${1:?usage: bash bench/quick_search.sh DATASET}
REAL=${MEDMNIST_DIR:-$(cd .. && pwd)/shared/data/medmnist}
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
export ENGINE_MODELS_DIR=$WORK/models ENGINE_CACHE_DIR=$WORK/cache
MEDMNIST_DIR=$REAL python bench/generated_subsets.py "$WORK/generated" >/dev/null
case $D in pneumoniamnist|breastmnist) export MEDMNIST_DIR=$REAL;; *) export MEDMNIST_DIR=$WORK/generated;; esac
echo "date: $(date -u +%F), $(nproc) cores, commit $(git rev-parse --short HEAD 2>/dev/null)$(git diff --quiet HEAD -- engine 2>/dev/null || echo ' with uncommitted changes to engine/')"
echo "=== $D: python -m engine train --dataset $D --recipe generic --quick-search"
python -m engine train --dataset $D --recipe generic --quick-search --name quick 2>/dev/null
echo "--- simulate against encrypt, 200 test images"
python -m engine evaluate --dataset $D --model quick --modes simulate,fhe --limit 200 2>/dev/null | tail -6
