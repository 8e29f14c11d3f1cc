"""Issue 31: is the generic recipe with 2-bit inputs (16 per neuron) less stable than with 3-bit
inputs (8 per neuron)? One run per seed of each (`train --recipe generic --seeds 1`, and the same with
`--input-bits 3 --max-active-inputs 8`), each circuit at the recipe's setting (rounding 6 bits,
approximate, p_error 0.01) simulated 20 times on the whole validation split: the agreement between
pairs of simulations, as the stability check measures it with 4 runs on 300 images.

    python bench/input_bits_stability.py retinamnist,bloodmnist 0,1 > bench/results/input_bits_stability.txt   # ~15 min
"""
import itertools
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))
W = tempfile.mkdtemp(prefix="stability-")
os.environ["ENGINE_MODELS_DIR"] = W + "/models"
os.environ["ENGINE_CACHE_DIR"] = W + "/cache"
from generated_subsets import make  # noqa: E402

make(Path(W) / "gen", Path(os.environ.get("MEDMNIST_DIR") or REPO.parent / "shared" / "data" / "medmnist"))
os.environ["MEDMNIST_DIR"] = W + "/gen"
from engine.config import DataConfig  # noqa: E402
from engine.learn.data import load_split  # noqa: E402
from engine.learn.registry import load as load_model  # noqa: E402
from engine.study.evaluate import agreement  # noqa: E402
from engine.study.infer import Predictor  # noqa: E402

VARS = {"i3k8": ["--input-bits", "3", "--max-active-inputs", "8"], "i2k16": []}
for d in sys.argv[1].split(","):
    for seed in sys.argv[2].split(","):
        for v, extra in VARS.items():
            name = f"{v}-{seed}"
            subprocess.run([sys.executable, "-m", "engine", "train", "--dataset", d, "--recipe", "generic", "--seed", seed,
                            "--seeds", "1", "--no-circuit-check", "--name", name, *extra], check=True,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=REPO)
            saved = load_model(d, name)
            p = Predictor(saved=saved)
            imgs = load_split(DataConfig(d, data_dir=os.environ["MEDMNIST_DIR"], allow_download=False), "val").images
            res = [p.run(imgs, ["simulate"])["simulate"] for _ in range(20)]
            ag = [agreement(a, b) for a, b in itertools.combinations(res, 2)]
            acc = saved.metrics["val"]["accuracy"]
            print(f"{d} seed {seed} {v:6s} val {100*acc:.1f}%  {saved.metrics['accumulator_bits']} bits  "
                  f"agreement over 190 pairs of 20 simulations of {len(imgs)} images: mean {100*np.mean(ag):.2f}%  min {100*min(ag):.2f}%  "
                  f"share of pairs < 99%: {np.mean(np.array(ag) < 0.99):.2f}", flush=True)
