"""Issue 31's levers on the generic recipe, measured on validation: when to prune, and how coarse a
client-side grid, on the kinds of subset without a search (generated RGB multi-class and ordinal
files, and the real BreastMNIST).

    python bench/subset_levers.py --out bench/results/subset_levers.json              # about 30 min on 2 cores
    python bench/subset_levers.py --subsets retinamnist --variants default,late --seeds 0

Each variant is the generic recipe (``engine.learn.recipes.GENERIC``) with a few fields changed,
trained with ``engine.learn.train.train`` (the QAT forward: the quantized model's own answers) for
each seed; the table gives the mean and the spread (max - min) of validation accuracy over the
seeds, beside the unpruned reference (the same recipe without pruning). Only validation
figures choose; the test split is not read here.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

VARIANTS = {
    "default": {},  # pruned to 8 inputs per neuron after one dense epoch
    "late": {"train": {"prune_after": 0.5}},  # dense for half the epochs, then pruned and fine-tuned
    "late-grid7": {"train": {"prune_after": 0.5}, "model": {"input_pool": 4}},  # 7x7 inputs per channel
    "grid7": {"model": {"input_pool": 4}},  # 7x7 inputs per channel (each the mean of 4x4 pixels)
    "grid4": {"model": {"input_pool": 7}},  # 4x4 inputs per channel (each the mean of 7x7 pixels)
    "wide32": {"model": {"hidden": (32,)}},  # twice the neurons, 8 inputs each (twice the lookups)
    "levels7": {"model": {"input_levels": 7}},  # + each channel's share of pixels above 7 fixed levels
    "levels15": {"model": {"input_levels": 15}},
    "levels7-grid7": {"model": {"input_levels": 7, "input_pool": 4}},
    "levels7-wide32": {"model": {"input_levels": 7, "hidden": (32,)}},
    "gradual10": {"train": {"prune_epochs": 10}},  # cut down to 8 inputs over 10 epochs
    "gradual20": {"train": {"prune_epochs": 20}},
    "gradual10-levels7": {"train": {"prune_epochs": 10}, "model": {"input_levels": 7}},
    "gradual10-levels7-grid7": {"train": {"prune_epochs": 10}, "model": {"input_levels": 7, "input_pool": 4}},
    "gradual20-levels7": {"train": {"prune_epochs": 20}, "model": {"input_levels": 7}},
    "gradual10-levels15": {"train": {"prune_epochs": 10}, "model": {"input_levels": 15}},
    "gradual10-levels7-wide32": {"train": {"prune_epochs": 10}, "model": {"input_levels": 7, "hidden": (32,)}},
    "unpruned-levels7": {"model": {"max_active_inputs": 0, "input_levels": 7}},
    "gradual10-levels7-e80": {"train": {"prune_epochs": 10, "epochs": 80}, "model": {"input_levels": 7}},
    "gradual10-levels7-grid7-e80": {"train": {"prune_epochs": 10, "epochs": 80}, "model": {"input_levels": 7, "input_pool": 4}},
    "gradual10-e80": {"train": {"prune_epochs": 10, "epochs": 80}},
    "unpruned": {"model": {"max_active_inputs": 0}},  # the reference (its circuit is wider and slower)
}


def run(dataset: str, data_dir: str, variant: dict, seed: int) -> dict:
    from engine.config import DataConfig, PipelineConfig
    from engine.learn.recipes import GENERIC
    from engine.learn.train import train

    m = dataclasses.replace(GENERIC["model"], **variant.get("model", {}))
    t = dataclasses.replace(GENERIC["train"], seed=seed, **variant.get("train", {}))
    cfg = PipelineConfig(data=DataConfig(dataset, data_dir=data_dir, allow_download=False), model=m, train=t,
                         compile=GENERIC["compile"])
    t0 = time.perf_counter()
    r = train(cfg)
    best = r.history[r.best_epoch - 1]
    return {"val_accuracy": r.metrics["val"]["accuracy"], "val_balanced": best.val_balanced_accuracy,
            "val_auc": r.metrics["val"]["auc"], "best_epoch": r.best_epoch, "seconds": time.perf_counter() - t0}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--subsets", default="bloodmnist,retinamnist,breastmnist")
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    real = os.environ.get("MEDMNIST_DIR") or str(REPO.parent / "shared" / "data" / "medmnist")
    gen = Path(tempfile.mkdtemp(prefix="generated-"))
    from generated_subsets import make

    make(gen, Path(real))
    seeds = [int(s) for s in a.seeds.split(",")]
    rows = []
    for d in a.subsets.split(","):
        folder = real if d in ("breastmnist", "pneumoniamnist") else str(gen)
        for v in a.variants.split(","):
            runs = [run(d, folder, VARIANTS[v], s) for s in seeds]
            accs = [x["val_accuracy"] for x in runs]
            row = {"subset": d, "variant": v, "changes": VARIANTS[v], "seeds": seeds, "runs": runs,
                   "mean": sum(accs) / len(accs), "spread": max(accs) - min(accs)}
            rows.append(row)
            print(f"{d:13s} {v:12s} val accuracy mean {100 * row['mean']:.1f}%  spread {100 * row['spread']:.1f} "
                  f"points  ({', '.join(f'{100 * x:.1f}' for x in accs)})  {sum(x['seconds'] for x in runs):.0f} s",
                  flush=True)
    if a.out:
        from engine.study.evaluate import machine_info

        Path(a.out).write_text(json.dumps({"date": time.strftime("%Y-%m-%d"), "machine": machine_info(),
                                           "rows": rows}, indent=2))
        print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
