"""Training: ``python -m engine train`` (through the one training pipeline, ``engine.learn.pipeline``)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from .args import UserError, compile_args, data_args, data_cfg, say, settle_stability, stability_args


def add_train(sub) -> None:
    p = sub.add_parser("train", help="train a QAT FCNN and save it to the registry")
    data_args(p)
    p.add_argument("--name", default=None, help="model name (default: derived from the architecture and time)")
    g = p.add_argument_group("recipe (default: the search's choice for the dataset, else a generic recipe; "
                             "`python -m engine train --dataset X --show-recipe` prints it)")
    g.add_argument("--hidden", type=int, nargs="*", default=None, help="hidden widths, e.g. --hidden 32 16 (none: linear)")
    g.add_argument("--weight-bits", type=int, default=None)
    g.add_argument("--act-bits", type=int, default=None)
    g.add_argument("--input-bits", type=int, default=None)
    g.add_argument("--max-active-inputs", type=int, default=None, help="prune to this many inputs per neuron (0: off)")
    g.add_argument("--input-pool", type=float, default=None,
                   help="average-pool the image by this factor on the client (2: 14x14 inputs; 2.8: 10x10, by area)")
    g.add_argument("--input-levels", type=int, default=None,
                   help="append each channel's share of pixels brighter than N fixed levels, computed on the client (0: off)")
    g.add_argument("--features", choices=["pixels", "scattering"], default=None,
                   help="the client's fixed feature stage: pixels (pooled) or scattering (Kymatio's 2D wavelet "
                        "scattering, standardized by the model)")
    g.add_argument("--scattering-j", type=int, default=None, help="scattering: number of scales J (default 2)")
    g.add_argument("--scattering-l", type=int, default=None, help="scattering: number of orientations L (default 8)")
    g.add_argument("--feature-grid", type=int, default=None,
                   help="scattering: average the coefficients onto an N x N grid (default 2)")
    g.add_argument("--augment", type=int, default=None, help="random shifts of up to N pixels during training")
    g.add_argument("--rotate", type=float, default=None, help="random rotations of up to N degrees during training")
    g.add_argument("--scale", type=float, default=None, help="random zoom by a factor in [1-S, 1+S] during training")
    g.add_argument("--stretch", type=float, default=None,
                   help="squeeze or stretch one axis by a factor in [1/(1+S), 1+S] during training (uploads squeezed to a square)")
    g.add_argument("--upload-augment", type=float, default=None,
                   help="share of training images given an upload's round trips each epoch (exposure, resize filters, blur, JPEG)")
    g.add_argument("--prune-after", type=float, default=None,
                   help="with --max-active-inputs: share of the epochs trained dense before pruning (0: after one epoch)")
    g.add_argument("--prune-epochs", type=int, default=None,
                   help="with --max-active-inputs: prune gradually over this many epochs (0 or 1: in one step)")
    g.add_argument("--seeds", type=int, default=None,
                   help="train this many runs (seeds --seed, --seed + 1, ...) and keep the best on validation")
    g.add_argument("--epochs", type=int, default=None)
    g.add_argument("--batch-size", type=int, default=None)
    g.add_argument("--lr", type=float, default=None)
    g.add_argument("--distill", type=float, default=None,
                   help="weight of a clear CNN teacher's soft labels in the loss, 0-1 (0: off; the teacher is cached)")
    g.add_argument("--teacher-epochs", type=int, default=None, help="epochs of the CNN teacher")
    g.add_argument("--rounding-noise", type=float, default=None,
                   help="noise-aware training: uniform noise of up to this many rounding steps on hidden pre-activations")
    g = p.add_argument_group("your own labelled images (one subfolder per class, as for evaluate --images)")
    g.add_argument("--images", default=None, metavar="DIR|ZIP",
                   help="also train on these labelled images, each put through the upload path and augmented on its "
                        "full-size image (framing, squeeze, exposure, blur, JPEG)")
    g.add_argument("--images-only", action="store_true", help="train on the images alone, not on MedMNIST's training split")
    g.add_argument("--label-map", default=None, help="class folders named otherwise: NAME=INDEX,... e.g. NORMAL=0,PNEUMONIA=1")
    g.add_argument("--holdout", type=float, default=0.1,
                   help="stratified share of the images held out for validation (default 0.1)")
    g.add_argument("--select-framed", action="store_true", default=None,
                   help="the held-out images validate in every upload framing (as given, centre crops, natural "
                        "aspect ratio, squeezed), not as given only")
    g.add_argument("--balance-decision", action="store_true", default=None,
                   help="binary tasks: after training, shift the decision to the offset that balances the errors "
                        "best on the validation sets (MedMNIST's and the held-out images in each framing)")
    g.add_argument("--image-copies", type=int, default=None,
                   help="random real-upload versions made of each image (default 8; each epoch trains on one)")
    p.add_argument("--seed", type=int, default=None, help="the first run's seed (default: the recipe's)")
    p.add_argument("--limit-train", type=int, default=0, help="use only the first N training images")
    p.add_argument("--show-recipe", action="store_true", help="print the settings that would be used, and why, and exit")
    p.add_argument("--quick-search", action="store_true",
                   help="also train the recipe's variants (without intensity levels; a 7x7 grid) and keep the best on "
                        "validation: up to 3x as long")
    p.add_argument("--recipe", choices=["auto", "generic"], default="auto",
                   help="auto: the search's choice for the dataset where there is one; generic: the generic recipe")
    p.add_argument("--no-class-weighting", action="store_true")
    p.add_argument("--overwrite", action="store_true", help="replace a model of the same name")
    compile_args(p)
    stability_args(p)
    p.add_argument("--no-circuit-check", action="store_true",
                   help="skip compiling, the stability check and the latency measurement after training")


def _train_config(a):
    """(config, recipe, where it comes from) of ``train``'s flags: the recipe with the flags given over it."""
    from dataclasses import replace

    from ..learn.data import dataset_info
    from ..learn.pipeline import configure

    dataset_info(a.dataset)
    try:
        data = replace(data_cfg(a), images=str(Path(a.images).resolve()) if a.images else "",
                       images_only=a.images_only, label_map=a.label_map or "", holdout=a.holdout)
        return configure(
            data, a.recipe,
            model=dict(hidden=tuple(a.hidden) if a.hidden is not None else None, weight_bits=a.weight_bits,
                       act_bits=a.act_bits, input_bits=a.input_bits, max_active_inputs=a.max_active_inputs,
                       input_pool=a.input_pool, input_levels=a.input_levels, features=a.features,
                       scattering_j=a.scattering_j, scattering_l=a.scattering_l, feature_grid=a.feature_grid),
            train=dict(epochs=a.epochs, batch_size=a.batch_size, lr=a.lr, seed=a.seed,
                       class_weighting=False if a.no_class_weighting else None, limit_train=a.limit_train or None,
                       augment_shift=a.augment, augment_rotate=a.rotate, augment_scale=a.scale,
                       augment_stretch=a.stretch, augment_upload=a.upload_augment, distill=a.distill,
                       teacher_epochs=a.teacher_epochs, rounding_noise=a.rounding_noise, image_copies=a.image_copies,
                       prune_after=a.prune_after, prune_epochs=a.prune_epochs, seeds=a.seeds,
                       select_framed=a.select_framed, balance_decision=a.balance_decision),
            compile=dict(rounding_threshold_bits=a.rounding_bits, rounding_method=a.rounding_method, p_error=a.p_error))
    except ValueError as exc:
        raise UserError(str(exc)) from None


def _show_recipe(cfg, base, a) -> int:
    from ..learn.features import summary
    from ..learn.recipes import EXPLAIN, GENERIC, STAGE_WHY

    print(json.dumps(cfg.to_dict(), indent=2))
    say(f"feature stage: {summary(cfg.model)} ({STAGE_WHY.get(cfg.model.features, '')})")
    if base["model"] == GENERIC["model"] and base["train"] == GENERIC["train"]:
        say("why (the generic recipe):")  # stderr: stdout stays the JSON
        for key, why in EXPLAIN.items():
            say(f"  {key}: {why}")
    if a.quick_search:
        from ..learn.quick_search import candidates

        say("--quick-search trains: " + "; ".join(name for name, _ in candidates(cfg)))
    return 0


def _train_hooks(cfg, a):
    """(hooks, close): tqdm bars on stderr for the images' preparation and the epochs."""
    from tqdm import tqdm

    from ..learn.pipeline import Hooks, epochs_total

    bar = tqdm(total=epochs_total(cfg, a.quick_search), desc="training", unit="epoch", file=sys.stderr, disable=None)
    ibar = tqdm(total=0, desc="preparing images", unit="img", file=sys.stderr, disable=None) if cfg.data.images else None

    def on_epoch(r):
        bar.update(1)
        bar.set_postfix(loss=f"{r.train_loss:.3f}", val_acc=f"{r.val_accuracy:.3f}")

    def on_image(done, total):
        ibar.total, ibar.n = total, done
        ibar.refresh()

    def on_prepared(images):
        ibar.close()
        say(f"{len(images.names)} labelled images ({len(images.unreadable)} unreadable): {len(images.train_index)} "
            f"train, {len(images.holdout_index)} held out for validation")
        for name, reason in images.unreadable[:10]:
            say(f"unreadable: {name}: {reason}")

    def close():
        bar.close()
        if ibar is not None:
            ibar.close()

    return Hooks(on_epoch, on_image, on_prepared, lambda m: bar.write(m, file=sys.stderr)), close


def _print_trained(t, models_dir) -> None:
    from ..learn import framing

    saved, m, g = t.saved, t.result.metrics, t.guard
    print(f"saved {saved.dataset}/{saved.name} (best epoch {m['best_epoch']}) to {saved.path}")
    print(f"learned from: {saved.sources_text()}")
    held = f"  held-out images accuracy {m['holdout']['accuracy']:.4f}" if "holdout" in m else ""
    for row in m.get("quick_search", []):
        chosen = "  <- kept" if row["variant"] == m["quick_search_chosen"] else ""
        print(f"quick search: {row['variant']:28s} validation accuracy {100 * row['val_accuracy']:.1f}%, "
              f"{row['accumulator_bits']}-bit accumulators{chosen}")
    if "seeds" in m:
        print(f"kept seed {m['chosen_seed']} of {len(m['seeds'])}: validation accuracy "
              + ", ".join(f"{100 * r['val_accuracy']:.1f}% ({r['accumulator_bits']} bits)" for r in m["seeds"])
              + f" (spread {100 * m['seed_spread']:.1f} points)")
    print(f"val accuracy {m['val']['accuracy']:.4f}{held}  test accuracy {m['test']['accuracy']:.4f}  "
          f"test AUC {m['test']['auc'] or float('nan'):.4f}")
    print(f"input check fitted: {100 * g.val_pass_rate:.1f}% of validation images pass; confidence temperature {g.temperature:.3f}")
    source = None if t.images is not None else framing.inherit(saved, models_dir)
    if t.images is not None:
        print("uploads go to this model as the upload path makes them: it learned from real uploads, so neither the "
              "squeeze estimator nor the softening applies")
    elif source is not None:
        print(f"uploads squeezed sideways are reframed by the estimator copied from {source.parent.name}")
    elif saved.dataset in framing.SQUEEZED_DATASETS:
        print(f"uploads squeezed sideways are not reframed yet: `python -m engine framing --dataset {saved.dataset} "
              f"--model {saved.name}` fits the estimator (about 4 min)")


def cmd_train(a) -> int:
    from ..learn.labelled import LabelError
    from ..learn.pipeline import run
    from ..learn.recipes import RecipeError

    try:
        cfg, base, source = _train_config(a)
    except RecipeError as exc:
        raise UserError(str(exc)) from None
    say(f"recipe: {source}; overridden by the flags given")
    if a.show_recipe:
        return _show_recipe(cfg, base, a)
    if cfg.train.seeds > 1:
        say(f"{cfg.train.seeds} runs (seeds {cfg.train.seed}-{cfg.train.seed + cfg.train.seeds - 1}): "
            "the best on validation is kept")
    hooks, close = _train_hooks(cfg, a)
    try:
        trained = run(cfg, a.name, a.models_dir, overwrite=a.overwrite, quick_search=a.quick_search, hooks=hooks)
    except (LabelError, FileNotFoundError) as exc:
        raise UserError(str(exc)) from None
    finally:
        close()
    _print_trained(trained, a.models_dir)
    if not a.no_circuit_check:
        from ..fhe.circuit import compile_model
        from ..study.evaluate import circuit_line

        saved = trained.saved
        say("compiling the circuit, checking its stability and timing it encrypted")
        compiled = compile_model(saved, saved.config.compile, None, say)
        print(circuit_line(compiled.report.to_dict()))
        if a.stability_images:
            s = settle_stability(saved, saved.config.compile, a, compiled)
            if s is not None and s.latency_s is not None:
                print(f"expected encrypted latency: {1000 * s.latency_s:.0f} ms per image (median of 3, this machine)")
    return 0


COMMANDS = {"train": (add_train, cmd_train)}
