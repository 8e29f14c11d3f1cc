"""Issue 31's levers on the generic recipe, measured on validation: when to prune, and how coarse a
client-side grid, on the kinds of subset without a search (generated RGB multi-class and ordinal
files, and the real BreastMNIST).

    python bench/subset_levers.py --out bench/results/subset_levers.json              # about 30 min on 2 cores
    python bench/subset_levers.py --subsets retinamnist --variants default,late --seeds 0

Each variant is the generic recipe as issue 20 left it (:data:`BASE`: one-step pruning after one
dense epoch, 40 epochs, no intensity levels) with a few fields changed, one run per seed, trained
with ``engine.learn.train.train`` (the QAT forward: the quantized model's own answers); the table
gives the mean and the spread (max - min) of validation accuracy over the seeds, beside the
unpruned reference (the same recipe without pruning). ``gradual10-levels7-e80`` is today's
generic recipe (``engine.learn.recipes.GENERIC``) but for its best-of-3 rule. Only validation
figures choose; the test split is not read here.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import tempfile
import time
from pathlib import Path
from engine.config import shared_medmnist_dir

REPO = Path(__file__).resolve().parent.parent

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
    "gradual10-levels7-e80-wide24": {"train": {"prune_epochs": 10, "epochs": 80},
                                     "model": {"input_levels": 7, "hidden": (24,)}},  # 24 lookups instead of 16
    "gradual10-levels7-e80-16x8": {"train": {"prune_epochs": 10, "epochs": 80},
                                   "model": {"input_levels": 7, "hidden": (16, 8)}},  # a second layer: 24 lookups
    "gradual10-levels7-e80-distill": {"train": {"prune_epochs": 10, "epochs": 80, "distill": 0.5},
                                      "model": {"input_levels": 7}},  # the clear CNN teacher's soft labels
    "gradual10-distill": {"train": {"prune_epochs": 10, "distill": 0.5}},
    # Fewer bits per input, more inputs per neuron: the same accumulator range may cover twice the image
    "gradual10-levels7-e80-i2k16": {"train": {"prune_epochs": 10, "epochs": 80},
                                    "model": {"input_levels": 7, "input_bits": 2, "max_active_inputs": 16}},
    "gradual10-levels7-e80-i2k12": {"train": {"prune_epochs": 10, "epochs": 80},
                                    "model": {"input_levels": 7, "input_bits": 2, "max_active_inputs": 12}},
    "gradual10-levels7-e80-k12": {"train": {"prune_epochs": 10, "epochs": 80},
                                  "model": {"input_levels": 7, "max_active_inputs": 12}},
    "gradual10-e80-i2k16": {"train": {"prune_epochs": 10, "epochs": 80}, "model": {"input_bits": 2, "max_active_inputs": 16}},
    "gradual10-levels7-e80-i2k24": {"train": {"prune_epochs": 10, "epochs": 80},
                                    "model": {"input_levels": 7, "input_bits": 2, "max_active_inputs": 24}},
    "gradual10-levels7-e80-i2k16-a2": {"train": {"prune_epochs": 10, "epochs": 80},
                                       "model": {"input_levels": 7, "input_bits": 2, "max_active_inputs": 16, "act_bits": 2}},
    "gradual10-levels7-grid7-e80-i2k16": {"train": {"prune_epochs": 10, "epochs": 80},
                                          "model": {"input_levels": 7, "input_pool": 4, "input_bits": 2,
                                                    "max_active_inputs": 16}},
    "gradual10-levels15-e80-i2k16": {"train": {"prune_epochs": 10, "epochs": 80},
                                     "model": {"input_levels": 15, "input_bits": 2, "max_active_inputs": 16}},
    "gradual10-levels7-e80-i2k16-distill": {"train": {"prune_epochs": 10, "epochs": 80, "distill": 0.5},
                                            "model": {"input_levels": 7, "input_bits": 2, "max_active_inputs": 16}},
    # for --base search (BreastMNIST's searched recipe prunes to 16 inputs of 3 bits)
    "i2k32": {"model": {"input_bits": 2, "max_active_inputs": 32}},
    "gradual10-i2k32": {"train": {"prune_epochs": 10}, "model": {"input_bits": 2, "max_active_inputs": 32}},
    "gradual10-i2k32-distill": {"train": {"prune_epochs": 10, "distill": 0.5},
                                "model": {"input_bits": 2, "max_active_inputs": 32}},
    "unpruned": {"model": {"max_active_inputs": 0}},  # the reference (its circuit is wider and slower)
    # issue 38: the client's feature stage (engine.learn.features) as a lever. Kymatio's wavelet
    # scattering (J=2, L=8: 81 channels per image channel) averaged onto 2x2 or 3x3, standardized
    # by the model, each neuron pruned gradually to its 16 or 24 strongest features
    "scatter2-k16": {"train": {"prune_epochs": 10},
                     "model": {"features": "scattering", "feature_grid": 2, "max_active_inputs": 16, "input_levels": 0}},
    "scatter3-k24": {"train": {"prune_epochs": 10},
                     "model": {"features": "scattering", "feature_grid": 3, "max_active_inputs": 24, "input_bits": 3,
                               "input_levels": 0}},
    "scatter3-k24-balanced": {"train": {"prune_epochs": 10, "balance_decision": True},
                              "model": {"features": "scattering", "feature_grid": 3, "max_active_inputs": 24,
                                        "input_bits": 3, "input_levels": 0}},
}


def base() -> dict:
    """The generic recipe as issue 20 left it: what every variant changes."""
    from engine.config import CompileConfig, ModelConfig, TrainConfig

    return {"model": ModelConfig(hidden=(16,), weight_bits=2, act_bits=3, input_bits=3, max_active_inputs=8, input_pool=2),
            "train": TrainConfig(epochs=40, batch_size=64, lr=2e-3, augment_shift=2, augment_rotate=10.0,
                                 augment_scale=0.1),
            "compile": CompileConfig(rounding_threshold_bits=6, rounding_method="approximate", p_error=0.01)}


def run(dataset: str, data_dir: str, variant: dict, seed: int, base_name: str = "issue20") -> dict:
    from engine.config import DataConfig, PipelineConfig
    from engine.learn.recipes import recipe
    from engine.learn.train import train

    b = base() if base_name == "issue20" else recipe(dataset)[0]  # "search": the dataset's searched recipe
    m = dataclasses.replace(b["model"], **variant.get("model", {}))
    t = dataclasses.replace(b["train"], seed=seed, **variant.get("train", {}))
    cfg = PipelineConfig(data=DataConfig(dataset, data_dir=data_dir, allow_download=False), model=m, train=t,
                         compile=b["compile"])
    t0 = time.perf_counter()
    r = train(cfg)
    best = r.history[r.best_epoch - 1]
    return {"val_accuracy": r.metrics["val"]["accuracy"], "val_balanced": best.val_balanced_accuracy,
            "val_auc": r.metrics["val"]["auc"], "best_epoch": r.best_epoch, "seconds": time.perf_counter() - t0,
            "accumulator_bits": r.metrics.get("accumulator_bits")}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--subsets", default="bloodmnist,retinamnist,breastmnist")
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--base", choices=["issue20", "search"], default="issue20",
                    help="what the variants change: issue 20's generic recipe, or the dataset's searched recipe "
                         "(its rows are named search:VARIANT)")
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    real = str(shared_medmnist_dir())
    gen = Path(tempfile.mkdtemp(prefix="generated-"))
    from generated_subsets import make

    make(gen, Path(real))
    seeds = [int(s) for s in a.seeds.split(",")]
    rows = []
    for d in a.subsets.split(","):
        folder = real if d in ("breastmnist", "pneumoniamnist") else str(gen)
        for v in a.variants.split(","):
            runs = [run(d, folder, VARIANTS[v], s, a.base) for s in seeds]
            accs = [x["val_accuracy"] for x in runs]
            row = {"subset": d, "variant": v if a.base == "issue20" else f"search:{v}", "changes": VARIANTS[v], "seeds": seeds, "runs": runs,
                   "mean": sum(accs) / len(accs), "spread": max(accs) - min(accs)}
            rows.append(row)
            print(f"{d:13s} {v:12s} val accuracy mean {100 * row['mean']:.1f}%  spread {100 * row['spread']:.1f} "
                  f"points  ({', '.join(f'{100 * x:.1f}' for x in accs)})  {sum(x['seconds'] for x in runs):.0f} s  "
                  f"accumulators {[x['accumulator_bits'] for x in runs]} bits",
                  flush=True)
    if a.out:
        from engine.study.evaluate import machine_info

        # rows of other subsets and variants already in the file stay; these replace their namesakes
        out = Path(a.out)
        kept = json.loads(out.read_text())["rows"] if out.exists() else []
        mine = {(r["subset"], r["variant"]) for r in rows}
        for r in rows:
            r["date"] = time.strftime("%Y-%m-%d")
        out.write_text(json.dumps({"date": time.strftime("%Y-%m-%d"), "machine": machine_info(),
                                   "rows": [r for r in kept if (r["subset"], r["variant"]) not in mine] + rows},
                                  indent=2))
        print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
