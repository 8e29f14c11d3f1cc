"""A short automatic search for a new subset (``train --quick-search``, the Train page's checkbox):
the recipe and a handful of variants of it (:data:`engine.learn.recipes.SEARCH_VARIANTS`), each
trained as the recipe says (its seeds included), the one that scores best on validation kept.

Only validation chooses; the test split reports, as for every training. The variants change the
client's fixed preprocessing only (intensity levels, grid): every one keeps the recipe's
bit-widths, width and pruning. Their accumulators can still differ by a bit (with the levels,
the generated RGB file's reached 7), so runs within 6 bits go first, as for the seeds.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

from ..config import PipelineConfig
from .recipes import SEARCH_VARIANTS
from .train import ProgressFn, TrainResult, better, renumbered, train
from .trainset import prepared_images


def candidates(cfg: PipelineConfig) -> list[tuple[str, PipelineConfig]]:
    """(name, config) of each variant of ``cfg`` that differs from those before it."""
    out: list[tuple[str, PipelineConfig]] = []
    for name, changes in SEARCH_VARIANTS.items():
        c = cfg.replace(model=dataclasses.replace(cfg.model, **changes))
        if all(c.model != seen.model for _, seen in out):
            out.append((name, c))
    return out


def quick_search(cfg: PipelineConfig, progress: ProgressFn | None = None,
                 say: Callable[[str], None] = lambda _m: None, images=None) -> TrainResult:
    """Train each of :func:`candidates` and return the best on validation (narrow accumulators first:
    :func:`engine.learn.train.better`); its ``config`` is the
    chosen variant's, and ``metrics["quick_search"]`` lists every candidate's validation figures.
    ``progress`` counts epochs over all the candidates' runs."""
    found = candidates(cfg)
    images = prepared_images(cfg, images, say)  # once for all the candidates
    per = cfg.train.epochs * cfg.train.seeds
    best, rows = None, []
    for i, (name, c) in enumerate(found):
        say(f"candidate {i + 1} of {len(found)}: {name}")
        one = train(c, renumbered(progress, i * per, len(found) * per), say, images)
        rows.append({"variant": name, "model": dataclasses.asdict(c.model), "score": one.score,
                     "val_accuracy": one.metrics["val"]["accuracy"], "val_auc": one.metrics["val"]["auc"],
                     "seed_spread": one.metrics.get("seed_spread"), "accumulator_bits": one.metrics["accumulator_bits"]})
        say(f"{name}: validation accuracy {100 * rows[-1]['val_accuracy']:.1f}%")
        if better(one, best):
            best, best_name = one, name
    best.metrics["quick_search"] = rows
    best.metrics["quick_search_chosen"] = best_name
    return best
