"""Default training recipes: the design-space search's choice per dataset where one was made,
a generic recipe otherwise.

The search (``python -m engine search``) chose, on validation only, the recipes the shipped
models use: client-side pooling, 2-3 bit weights and activations, augmentation, rounding to 6
bits (stable: repeated simulations agree). Its choice is shipped
as ``engine/learn/searched/<dataset>.json`` (``search --adopt`` writes it); a dataset never searched gets :data:`GENERIC`, the
same kind of recipe with what the second round measured on both searched datasets: each hidden
neuron pruned (gradually) to its strongest inputs so accumulators stay at 6 bits for any image size or
channel count (Concrete picks one parameter set for the whole circuit from its widest integer:
an unpruned RGB subset reached 8 bits and 763 ms per image), and ``p_error`` 0.01, which halves
the cost of 6-bit lookups. With 3-bit inputs pruned to 16, the first-layer accumulators still
reached 7 bits on RGB, multi-label and ordinal subsets, and on PneumoniaMNIST; 8 inputs of 3 bits,
or 16 of 2 bits (the same range, twice the image: what the recipe uses), stay at 6 bits in most
runs, all but the 14-label subset's outputs (``bench/generic_defaults.sh``). Training and compiling check
stability and adopt the nearest stable setting by themselves when that one is not
(``engine.study.stability.settle``).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from ..config import CompileConfig, ModelConfig, TrainConfig

SEARCHED_DIR = Path(__file__).resolve().parent / "searched"  # package data: one file per searched dataset

GENERIC = {
    # Issue 31 (bench/subset_levers.py, validation only, 3 seeds each): pruning gradually over 10
    # epochs with 70 epochs after it, and each channel's intensity levels, took the generated
    # ordinal subset from 71% to 85% (the unpruned model: 90%), BreastMNIST from 74% to 77-79%.
    # 2-bit inputs, 16 per neuron: the same accumulator range covers twice the image, which took
    # the generated RGB subset from 79% to 85% (spread 1.3 points) and kept the ordinal one at 85%.
    # Runs of one recipe still differ by 1-5 points, so three are trained and the best on
    # validation kept (runs within 6-bit accumulators first).
    "model": ModelConfig(hidden=(16,), weight_bits=2, act_bits=3, input_bits=2, max_active_inputs=16, input_pool=2,
                         input_levels=7),
    "train": TrainConfig(epochs=80, batch_size=64, lr=2e-3, augment_shift=2, augment_rotate=10.0, augment_scale=0.1,
                         prune_epochs=10, seeds=3),
    "compile": CompileConfig(rounding_threshold_bits=6, rounding_method="approximate", p_error=0.01),
}

# Why each setting of the generic recipe is what it is (``train --show-recipe`` prints it).
EXPLAIN = {
    "hidden": "16 neurons: each is one table lookup in the circuit, and latency follows their number",
    "weight_bits": "2-bit weights keep the accumulators narrow (Concrete sizes the whole circuit by its widest integer)",
    "act_bits": "3-bit activations, as BreastMNIST's search chose (PneumoniaMNIST's chose 2)",
    "input_bits": "2-bit inputs (4 values): a sum of 16 of them spans what 8 inputs of 3 bits did, so a neuron sees "
                  "twice the image within 6-bit accumulators (the generated RGB subset: 84.8% against 79.4%)",
    "max_active_inputs": "each neuron keeps its 16 strongest inputs, so accumulators stay at 6 bits in most runs, "
                         "whatever the image size or channel count (24 reached 7 bits and gained nothing)",
    "input_pool": "2x2 pixel means on the client: 14x14 inputs per channel",
    "input_levels": "each channel's (and an RGB image's brightness) share of pixels above 7 fixed levels, computed "
                    "on the client: a whole-image summary a neuron can add up within its 16 inputs",
    "prune_epochs": "the inputs are cut down to 16 over 10 epochs, the weights learning between cuts, so the "
                    "network chooses them",
    "epochs": "80: with 70 epochs after the last cut the generated ordinal subset reached 85% on validation, with 30 "
              "79% (the RGB subset and BreastMNIST within a point either way)",
    "seeds": "3 runs, the best on validation kept (within 6-bit accumulators first): single runs differ by 1-5 points",
    "rounding_threshold_bits": "6-bit rounding before each lookup: stable (repeated simulations agree)",
    "p_error": "0.01 halves the cost of 6-bit lookups",
}

# Why a recipe's feature stage is what it is (``train --show-recipe`` prints it with the stage).
STAGE_WHY = {
    "pixels": "the pooled image: every recipe's stage until another measures better on the subset's validation split",
    "scattering": "Kymatio's wavelet scattering, fixed and stable to small shifts: on PneumoniaMNIST it measured "
                  "better than pixels on validation and on held-out real X-rays (docs/own-images.md)",
}

# ``train --quick-search``: the recipe and these variants of it, each trained as the recipe says
# (its seeds), the best on validation kept. Where each helps (bench/results/subset_levers.json):
# the levels help subsets whose label follows intensity or colour, and hurt others (with 3-bit
# inputs the generated RGB subset did better without them: 82.5% against 79.4%; with the 2-bit
# inputs it does not: 83.0% against 84.8%); a 7x7 grid helped the ordinal one (86.8% against 85.2%,
# at 7-bit accumulators).
SEARCH_VARIANTS = {
    "the recipe": {},
    "without intensity levels": {"input_levels": 0},
    "7x7 grid (4x4 pixel means)": {"input_pool": 4},
}


def apply(part, **overrides):
    """A recipe's config ``part`` (a frozen dataclass) with the ``overrides`` that are not None:
    every field not overridden keeps the recipe's value."""
    import dataclasses

    return dataclasses.replace(part, **{k: v for k, v in overrides.items() if v is not None})


class RecipeError(ValueError):
    """A shipped recipe file that cannot be read as a recipe (named, with what is wrong)."""


def recipes_dir() -> Path:
    """Where the searched recipes are: ``$ENGINE_RECIPES_DIR``, else this package's ``searched/``."""
    return Path(os.environ.get("ENGINE_RECIPES_DIR") or SEARCHED_DIR)


def recipe(dataset: str, folder: Path | None = None) -> tuple[dict, str]:
    """({"model", "train", "compile"} configs, where they come from) for ``dataset``: the search's
    choice shipped as ``searched/<dataset>.json`` (:func:`adopt` writes it), else :data:`GENERIC`.
    A file that is there but broken is a :class:`RecipeError`, never a silent fallback."""
    path = Path(folder or recipes_dir()) / f"{dataset.lower()}.json"
    if not path.exists():
        return dict(GENERIC), "the generic recipe (no search for this dataset)"
    try:
        chosen = json.loads(path.read_text(encoding="utf-8"))["config"]
        m, t, c = chosen["model"], chosen["train"], chosen["compile"]
        return ({"model": ModelConfig(**{**m, "hidden": tuple(m["hidden"])}),
                 "train": TrainConfig(**{**t, "limit_train": 0}),
                 "compile": CompileConfig(**c)}, f"the search's choice for {dataset} ({path.name})")
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise RecipeError(f"the recipe {path} is broken ({type(exc).__name__}: {exc}); mend it or delete it to train "
                          "with the generic recipe") from None


def adopt(search: dict, folder: Path | None = None) -> Path:
    """Ship a search's chosen point (``python -m engine search --adopt``) as its dataset's recipe."""
    dataset = search["dataset"]
    c = search["chosen"]["config"]
    path = Path(folder or recipes_dir()) / f"{dataset.lower()}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    body = {"dataset": dataset, "from": "python -m engine search: the point chosen on validation",
            "config": {"model": c["model"], "train": {**c["train"], "limit_train": 0}, "compile": c["compile"]}}
    path.write_text(json.dumps(body, indent=1) + "\n", encoding="utf-8")
    recipe(dataset, path.parent)  # it reads back
    return path
