#!/bin/bash
# Issues 20 and 31: the generic recipe's defaults on every kind of subset, 3 seeds (2 cores: about 40 minutes).
#   bash bench/generic_defaults.sh > bench/results/generic_defaults.txt
#   SUBSETS="retinamnist bloodmnist" SEEDS="0 10" bash bench/generic_defaults.sh     # a part of it
# For each subset and each seed: train with the generic recipe and nothing else (`--recipe generic`:
# it trains --seeds runs from that seed and keeps the best on validation), and the same recipe without
# pruning and with 3-bit inputs, one run (the unpruned reference, the same model as issue 31 measured
# against: its mean over the seeds is the mean of 3 runs). For the first seed, the training ends
# with the circuit's bit-width, stability and encrypted latency, and simulate is compared with encrypt
# on 200 test images. A summary per subset closes: the mean and spread (max - min) over the seeds of
# validation accuracy, beside the unpruned reference's mean, and the test accuracy. The RGB
# multi-class, multi-label and ordinal files are generated from the real ones
# (bench/generated_subsets.py): for checking the recipe, never for reporting accuracy on those subsets.
set -u
cd "$(dirname "$0")/.."
REAL=${MEDMNIST_DIR:-$(cd .. && pwd)/shared/data/medmnist}
SUBSETS=${SUBSETS:-breastmnist pneumoniamnist bloodmnist chestmnist retinamnist}
SEEDS=${SEEDS:-0 10 20}
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
export ENGINE_MODELS_DIR=$WORK/models ENGINE_CACHE_DIR=$WORK/cache
MEDMNIST_DIR=$REAL python bench/generated_subsets.py "$WORK/generated" >/dev/null
echo "generic recipe: $(python -c 'from engine.learn.recipes import GENERIC as G; print(G["model"]); print(G["train"]); print(G["compile"])')"
echo "date: $(date -u +%F), $(nproc) cores, commit $(git rev-parse --short HEAD 2>/dev/null)$(git diff --quiet HEAD -- engine 2>/dev/null || echo ' with uncommitted changes to engine/')"
: >"$WORK/summary"
for D in $SUBSETS; do
  case $D in pneumoniamnist|breastmnist) export MEDMNIST_DIR=$REAL;; *) export MEDMNIST_DIR=$WORK/generated;; esac
  FIRST=1
  for S in $SEEDS; do
    echo "=== $D, seed $S"
    if [ $FIRST = 1 ]; then
      python -m engine train --dataset $D --recipe generic --seed $S --name generic-$S 2>/dev/null | tee "$WORK/out"
    else
      python -m engine train --dataset $D --recipe generic --seed $S --name generic-$S --no-circuit-check 2>/dev/null \
        | grep -E "kept seed|val accuracy" | tee "$WORK/out"
    fi
    read -r VAL TEST < <(awk '/^val accuracy/ {print $3, $6}' "$WORK/out")
    echo "--- without pruning"
    python -m engine train --dataset $D --recipe generic --seed $S --seeds 1 --max-active-inputs 0 --input-bits 3 --name noprune-$S \
      --no-circuit-check 2>/dev/null | grep -E "kept seed|val accuracy" | tee "$WORK/out"
    read -r UVAL UTEST < <(awk '/^val accuracy/ {print $3, $6}' "$WORK/out")
    echo "$D $S $VAL $TEST $UVAL $UTEST" >>"$WORK/summary"
    if [ $FIRST = 1 ]; then
      echo "--- simulate against encrypt, 200 test images"
      python -m engine evaluate --dataset $D --model generic-$S --modes simulate,fhe --limit 200 2>/dev/null | tail -6
      FIRST=0
    fi
  done
done
echo
echo "=== summary: validation accuracy over the seeds (each the best of the recipe's runs), unpruned reference"
awk '{n[$1]++; v[$1]+=$3; u[$1]+=$5; t[$1]+=$4; if (!($1 in lo) || $3 < lo[$1]) lo[$1]=$3; if (!($1 in hi) || $3 > hi[$1]) hi[$1]=$3}
     END {printf "%-15s %6s %10s %8s %10s %6s %10s\n", "subset", "seeds", "val mean", "spread", "unpruned", "gap", "test mean";
          for (d in n) printf "%-15s %6d %9.1f%% %8.1f %9.1f%% %6.1f %9.1f%%\n", d, n[d], 100*v[d]/n[d], 100*(hi[d]-lo[d]),
                                 100*u[d]/n[d], 100*(u[d]-v[d])/n[d], 100*t[d]/n[d]}' "$WORK/summary"
