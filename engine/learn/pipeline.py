"""The training pipeline, in one place: a recipe with the caller's overrides, the labelled images
prepared, the model trained (or the quick search's variants, the best on validation kept),
saved with its provenance, and its input check and confidence fitted.

The CLI (``python -m engine train``), the Train page and the bench scripts that train call
:func:`configure` and :func:`run`; they differ only in how they show progress (:class:`Hooks`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from ..config import DataConfig, PipelineConfig
from . import recipes


def _quiet(_message: str) -> None:
    return None


@dataclass
class Hooks:
    """How a caller follows a training: each epoch's report, the labelled images' preparation
    (done, total), the prepared images once, and one-line messages."""

    on_epoch: Callable | None = None  # engine.learn.train.ProgressFn
    on_images: Callable[[int, int], None] | None = None
    on_prepared: Callable | None = None  # (TrainingImages) -> None
    say: Callable[[str], None] = field(default=_quiet)


@dataclass
class Trained:
    """What :func:`run` made: the training's result, the saved model, its fitted guard and the
    labelled images it learned from (None without ``--images``)."""

    result: object  # engine.learn.train.TrainResult
    saved: object  # engine.learn.registry.SavedModel
    guard: object  # engine.learn.guard.Guard
    images: object | None  # engine.learn.labelled.TrainingImages


def configure(data: DataConfig, recipe: str = "auto", model: dict | None = None, train: dict | None = None,
              compile: dict | None = None) -> tuple[PipelineConfig, dict, str]:
    """(config, the recipe it started from, where that recipe comes from): ``data.dataset``'s
    recipe (``recipe="auto"``: the search's choice where there is one; ``"generic"``) with the
    given overrides over it (:func:`engine.learn.recipes.apply`: a None override keeps the
    recipe's value, and so does every field not named). A bad value is a ValueError."""
    if recipe == "auto":
        base, source = recipes.recipe(data.dataset)
    elif recipe == "generic":
        base, source = dict(recipes.GENERIC), "the generic recipe (--recipe generic)"
    else:
        raise ValueError(f"unknown recipe {recipe!r}: auto or generic")
    cfg = PipelineConfig(data=data, model=recipes.apply(base["model"], **(model or {})),
                         train=recipes.apply(base["train"], **(train or {})),
                         compile=recipes.apply(base["compile"], **(compile or {})))
    if cfg.train.epochs < 1:
        raise ValueError("--epochs must be at least 1")
    return cfg, base, source


def prepare(cfg: PipelineConfig, hooks: Hooks | None = None):
    """The labelled images of ``cfg.data.images`` read and put through the upload path (None
    without them); a missing MedMNIST file fails here, before any training starts."""
    from .data import dataset_info, locate
    from .labelled import training_images

    hooks = hooks or Hooks()
    locate(cfg.data)
    if not cfg.data.images:
        return None
    if not Path(cfg.data.images).exists():
        raise FileNotFoundError(f"{cfg.data.images} does not exist: give a folder or a .zip with one subfolder per class")
    images = training_images(cfg.data, dataset_info(cfg.data.dataset), cfg.train.image_copies, cfg.train.seed,
                             progress=hooks.on_images)
    if hooks.on_prepared:
        hooks.on_prepared(images)
    return images


def run(cfg: PipelineConfig, name: str | None = None, models_dir: str | Path | None = None, overwrite: bool = False,
        quick_search: bool = False, hooks: Hooks | None = None, images=None) -> Trained:
    """Train per ``cfg`` (``quick_search``: the recipe's variants too), save the model, fit its
    guard; ``images``: labelled images already prepared by :func:`prepare`."""
    from . import guard as guards
    from . import registry
    from .quick_search import quick_search as search
    from .train import train

    hooks = hooks or Hooks()
    if images is None:
        images = prepare(cfg, hooks)
    result = (search if quick_search else train)(cfg, progress=hooks.on_epoch, say=hooks.say, images=images)
    saved = registry.save(result, name, models_dir, overwrite=overwrite)
    guard = guards.fit_for(saved, cfg.data, images=images)
    return Trained(result, saved, guard, images)


def epochs_total(cfg: PipelineConfig, quick_search: bool = False) -> int:
    """Epochs a :func:`run` reports (every seed, every quick-search candidate): a progress bar's length."""
    from .quick_search import candidates

    return cfg.train.epochs * cfg.train.seeds * (len(candidates(cfg)) if quick_search else 1)
