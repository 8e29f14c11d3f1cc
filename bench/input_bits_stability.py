"""Issue 31: is the generic recipe with 2-bit inputs (16 per neuron) less stable than with 3-bit
inputs (8 per neuron)? One run per seed of each (the generic recipe with one seed, and the same
with 3-bit inputs and 8 per neuron), each circuit at the recipe's setting (rounding 6 bits,
approximate, p_error 0.01) simulated 20 times on the whole validation split: the agreement between
pairs of simulations (:func:`engine.study.stability.measure`, which the stability check runs with 4
runs on 300 images). The subsets are generated from the shared MedMNIST files
(``bench/generated_subsets.py``) in a temporary folder.

    python bench/input_bits_stability.py retinamnist,bloodmnist 0,1 > bench/results/input_bits_stability.txt   # ~15 min
"""
import argparse
import tempfile
from pathlib import Path

import numpy as np

from engine.config import DataConfig, shared_medmnist_dir
from engine.learn import pipeline
from engine.learn.data import load_split
from engine.study.infer import Predictor
from engine.study.stability import measure
from generated_subsets import make

VARIANTS = {"i3k8": {"input_bits": 3, "max_active_inputs": 8}, "i2k16": {}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("datasets", help="comma-separated generated subsets, e.g. retinamnist,bloodmnist")
    ap.add_argument("seeds", help="comma-separated seeds, e.g. 0,1")
    ap.add_argument("--runs", type=int, default=20, help="simulations per circuit")
    a = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="stability-"))
    make(work / "gen", shared_medmnist_dir())
    for d in a.datasets.split(","):
        data = DataConfig(d, data_dir=str(work / "gen"), allow_download=False)
        images = load_split(data, "val").images
        for seed in (int(s) for s in a.seeds.split(",")):
            for v, model in VARIANTS.items():
                cfg, _base, _src = pipeline.configure(data, "generic", model=model, train={"seed": seed, "seeds": 1})
                saved = pipeline.run(cfg, f"{v}-{seed}", work / "models").saved
                s = measure(Predictor(saved=saved, cache_dir=work / "cache"), images, runs=a.runs)
                pairs = np.array(s.pairs)
                print(f"{d} seed {seed} {v:6s} val {100 * saved.metrics['val']['accuracy']:.1f}%  "
                      f"{saved.metrics['accumulator_bits']} bits  agreement over {len(pairs)} pairs of {a.runs} "
                      f"simulations of {len(images)} images: mean {100 * s.agreement:.2f}%  min {100 * pairs.min():.2f}%  "
                      f"share of pairs < 99%: {np.mean(pairs < 0.99):.2f}", flush=True)


if __name__ == "__main__":
    main()
