"""Default training recipes: the design-space search's choice per dataset where one was made,
a generic recipe otherwise.

The search (``python -m engine search``) chose, on validation only, the recipes the shipped
models use: client-side pooling, 2-3 bit weights and activations, augmentation, rounding to 6
bits (stable: repeated simulations agree). Its choice is read from
``bench/results/<dataset>_search.json``; a dataset never searched gets :data:`GENERIC`, the
same kind of recipe with what the second round measured on both searched datasets: each hidden
neuron pruned to its strongest inputs so accumulators stay at 6 bits for any image size or
channel count (Concrete picks one parameter set for the whole circuit from its widest integer:
an unpruned RGB subset reached 8 bits and 763 ms per image), and ``p_error`` 0.01, which halves
the cost of 6-bit lookups. Pruned to 16 inputs, the first-layer accumulators still reached 7 bits
on RGB, multi-label and ordinal subsets, and on PneumoniaMNIST; pruned to 8 they stay at 6 bits
on all but the 14-label subset (``bench/generic_defaults.sh``). Training and compiling check
stability and adopt the nearest stable setting by themselves when that one is not
(``engine.study.stability.settle``).
"""

from __future__ import annotations

import json
from pathlib import Path

from ..config import REPO_ROOT, CompileConfig, ModelConfig, TrainConfig

RESULTS_DIR = REPO_ROOT / "bench" / "results"

GENERIC = {
    "model": ModelConfig(hidden=(16,), weight_bits=2, act_bits=3, input_bits=3, max_active_inputs=8, input_pool=2),
    "train": TrainConfig(epochs=40, batch_size=64, lr=2e-3, augment_shift=2, augment_rotate=10.0, augment_scale=0.1),
    "compile": CompileConfig(rounding_threshold_bits=6, rounding_method="approximate", p_error=0.01),
}


def recipe(dataset: str, results_dir: Path = RESULTS_DIR) -> tuple[dict, str]:
    """({"model", "train", "compile"} configs, where they come from) for ``dataset``."""
    path = Path(results_dir) / f"{dataset.lower()}_search.json"
    try:
        chosen = json.loads(path.read_text())["chosen"]["config"]
        m, t, c = chosen["model"], chosen["train"], chosen["compile"]
        return ({"model": ModelConfig(**{**m, "hidden": tuple(m["hidden"])}),
                 "train": TrainConfig(**{**t, "limit_train": 0}),
                 "compile": CompileConfig(**c)}, f"the search's choice for {dataset} ({path.name})")
    except (OSError, ValueError, KeyError, TypeError):
        return dict(GENERIC), "the generic recipe (no search for this dataset)"
