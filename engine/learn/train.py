"""Quantization-aware training: a plain loop with validation-based model selection."""

from __future__ import annotations

import copy
import dataclasses
import random
import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch
from torch import nn

from . import metrics
from .augment import random_affine, upload_like
from ..config import PipelineConfig, TrainConfig
from .data import Split, dataset_info, load_split
from .features import FeatureNorm, features, needs_norm, stage_of
from .model import QATFCNN, build_model
from .teacher import teacher_logits


@dataclass
class EpochReport:
    epoch: int
    epochs: int
    train_loss: float
    val_loss: float
    val_accuracy: float
    val_auc: float | None
    seconds: float
    val_balanced_accuracy: float | None = None
    holdout_accuracy: float | None = None  # on the labelled images held out (train --images)
    seed: int = 0  # the run's seed (TrainConfig.seeds > 1: epochs count on over the runs)


@dataclass
class TrainResult:
    model: QATFCNN
    config: PipelineConfig
    history: list[EpochReport] = field(default_factory=list)
    best_epoch: int = 0
    metrics: dict = field(default_factory=dict)
    thresholds: list[float] | None = None
    calibration: np.ndarray | None = None  # uint8 training images the compiler calibrates on
    sources: list[dict] = field(default_factory=list)  # what the model learned from (model.json)
    images: object = None  # the prepared labelled images (engine.learn.labelled.TrainingImages), if any
    score: float = float("-inf")  # the best epoch's validation selection score (what seeds compete on)
    feature_norm: FeatureNorm | None = None  # the model's scaling of its features (None: pixels)


CALIBRATION_SIZE = 512

# Where several runs compete (seeds, the quick search), those whose accumulators fit in this many
# bits go first: Concrete sizes the whole circuit by its widest integer, and a 7-bit circuit needed
# a slower setting to be stable (547 ms per image against 260-400 ms for 6 bits on the generated
# subsets, bench/results/generic_defaults.txt).
NARROW_BITS = 6


def better(a: "TrainResult", b: "TrainResult | None") -> bool:
    """Whether run ``a`` beats run ``b``: narrow accumulators (<= :data:`NARROW_BITS`) first, then
    the validation score."""
    if b is None:
        return True
    narrow = lambda r: r.metrics.get("accumulator_bits", NARROW_BITS) <= NARROW_BITS  # noqa: E731
    return (narrow(a), a.score) > (narrow(b), b.score)


ProgressFn = Callable[[EpochReport], None]


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def augment(images: np.ndarray, tc: TrainConfig, rng: np.random.Generator) -> np.ndarray:
    """One epoch's random copy of ``images`` (float32 0..255): framing, then an upload's round trips."""
    moved = random_affine(images, tc.augment_shift, tc.augment_rotate, tc.augment_scale, rng, tc.augment_stretch)
    if tc.augment_upload:
        moved = upload_like(moved, rng, tc.augment_upload)
    return moved


def class_weights(targets: np.ndarray, info) -> torch.Tensor | None:
    """Inverse-frequency weights (single-label) or positive weights (multi-label) of
    ``targets`` (:attr:`Split.targets`)."""
    y = targets
    if info.multi_label:
        pos = y.mean(axis=0).clip(1e-3, 1 - 1e-3)
        return torch.tensor((1 - pos) / pos, dtype=torch.float32)
    counts = np.bincount(y, minlength=info.n_outputs).astype(np.float64)
    w = len(y) / (len(counts) * np.maximum(counts, 1))
    return torch.tensor(w, dtype=torch.float32)


def loss_fn(targets: np.ndarray, info, weighted: bool) -> nn.Module:
    w = class_weights(targets, info) if weighted else None
    if info.multi_label:
        return nn.BCEWithLogitsLoss(pos_weight=w)
    return nn.CrossEntropyLoss(weight=w)


@torch.no_grad()
def logits_of(model: nn.Module, x: np.ndarray, batch: int = 1024) -> np.ndarray:
    model.eval()
    return np.concatenate([model(torch.from_numpy(x[i : i + batch])).numpy() for i in range(0, len(x), batch)])


def evaluate_float(model: QATFCNN, split: Split, thresholds=None, norm: FeatureNorm | None = None) -> dict:
    scores = metrics.scores_from_logits(logits_of(model, features(split.images, model.cfg, norm)), split.info)
    y = split.labels
    return {
        "accuracy": metrics.accuracy(y, scores, split.info, thresholds),
        "auc": metrics.auc(y, scores, split.info),
        "n": len(split),
    }


def selection_score(labels: np.ndarray, scores: np.ndarray, info, class_weighting: bool) -> tuple[float, float | None, float | None]:
    """(score, accuracy, balanced accuracy) an epoch or a teacher competes on. A class-weighted
    loss targets the balanced error (every class counts the same), so it competes on balanced
    accuracy: the prevalence in the validation split is not the one at a new hospital."""
    acc = metrics.accuracy(labels, scores, info)
    bal = metrics.balanced_accuracy(labels, scores, info)
    return (bal if class_weighting and bal is not None else acc), acc, bal


OFFSETS = np.round(np.arange(-3.0, 3.01, 0.1), 2)  # logit offsets balance_decision tries


def balance_decision(model: QATFCNN, sets: list[tuple[np.ndarray, np.ndarray]]) -> float:
    """Binary tasks: the offset ``d`` added to the class-1 logit minus the class-0 one that
    maximizes the mean balanced accuracy over ``sets`` [(features, labels)], ties to the smallest
    ``|d|``; folded into the output layer's bias (half each way), so argmax, the calibrated
    confidence and the circuit all decide with it. Returns ``d``."""
    margins = [(logits_of(model, x) @ np.array([-1.0, 1.0]), np.asarray(y).reshape(-1)) for x, y in sets]

    def balanced(d: float) -> float:
        return float(np.mean([np.mean([((m + d > 0) == c)[y == c].mean() for c in (0, 1) if (y == c).any()])
                              for m, y in margins]))

    best = max(OFFSETS, key=lambda d: (round(balanced(d), 6), -abs(d)))
    with torch.no_grad():
        bias = model.linears()[-1].bias
        bias[1] += float(best) / 2
        bias[0] -= float(best) / 2
    return float(best)


def fit_norm(model_cfg, clean: list[np.ndarray]) -> FeatureNorm | None:
    """The model's scaling of its features, fitted on the clean training images (None: pixels)."""
    if not needs_norm(model_cfg):
        return None
    return FeatureNorm.fit(np.concatenate([stage_of(model_cfg)(c) for c in clean]))


def held_out_sets(images, feat: Callable[[np.ndarray], np.ndarray], framed: bool, info,
                  size: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """[(features, labels)] of the labelled images' held-out part as uploaded and, with ``framed``,
    in each framing an upload comes in (centre crops, natural aspect ratio, squeezed)."""
    held = images.holdout_index if images is not None else np.arange(0)
    if not len(held):
        return []
    sets = [(feat(images.clean[held]), images.labels[held])]
    if framed:
        sets += [(feat(x), y) for x, y in images.framed(info, size, info.n_channels).values()]
    return sets


def read_only_used(model: QATFCNN, norm: FeatureNorm) -> tuple[QATFCNN, FeatureNorm]:
    """The model without the inputs no neuron of its first layer reads (pruning left their weights
    all zero), and the scaling that selects only the features it reads: the same function, fewer
    values to compute, encrypt and send. The weight quantizer's per-tensor scale is unchanged (the
    largest weight is kept)."""
    w = model.linears()[0].weight.detach()
    keep = np.flatnonzero((w != 0).any(dim=0).numpy())
    if len(keep) == w.shape[1]:
        return model, norm
    state = model.state_dict()
    state["layers.0.weight"] = state["layers.0.weight"][:, torch.from_numpy(keep)]
    small = build_model(len(keep), model.linears()[-1].out_features, model.cfg)
    small.load_state_dict(state)
    small.eval()
    return small, norm.keep(keep)


def distill_loss(student: torch.Tensor, teacher: torch.Tensor, temperature: float, multi_label: bool) -> torch.Tensor:
    """Soft-label loss: KL divergence at ``temperature`` (scaled by T**2, Hinton et al.), or BCE
    against the teacher's probabilities for multi-label tasks."""
    if multi_label:
        return nn.functional.binary_cross_entropy_with_logits(student, torch.sigmoid(teacher))
    t = temperature
    return nn.functional.kl_div(nn.functional.log_softmax(student / t, dim=1),
                                nn.functional.log_softmax(teacher / t, dim=1),
                                log_target=True, reduction="batchmean") * t * t


class RoundingNoise:
    """Training-time forward hooks on the hidden linear layers: add uniform noise of up to
    ``steps`` rounding steps to each pre-activation, where a step is the batch's pre-activation
    range divided by ``2**bits`` (what the circuit's rounding keeps). Hooks change neither the
    state dict nor the exported graph, and are removed on exit."""

    def __init__(self, model: QATFCNN, bits: int, steps: float):
        self.layers = model.linears()[:-1]
        self.scale, self.steps = 2.0 ** -bits, steps
        self.handles: list = []

    def _hook(self, module, _inputs, out):
        if not module.training:
            return out
        span = (out.detach().amax(dim=0) - out.detach().amin(dim=0)).max()
        return out + (torch.rand_like(out) * 2 - 1) * (self.steps * self.scale * span)

    def __enter__(self):
        if self.steps > 0:
            self.handles = [m.register_forward_hook(self._hook) for m in self.layers]
        return self

    def __exit__(self, *_exc):
        for h in self.handles:
            h.remove()


def build_teacher(cfg: PipelineConfig, train_split: Split, val_split: Split, criterion: nn.Module,
                  say: Callable[[str], None] = lambda _m: None) -> nn.Module:
    """The cached clear CNN teacher for this dataset and training settings (trained if new)."""
    from . import teacher as T

    tc, info = cfg.train, train_split.info
    # One teacher per dataset and augmentation, whatever the student's seed: students share it.
    settings = {"epochs": tc.teacher_epochs, "seed": 0, "shift": tc.augment_shift, "rotate": tc.augment_rotate,
                "scale": tc.augment_scale, "weighted": tc.class_weighting, "arch": "cnn32-v1"}
    key = T.teacher_key(cfg.data.dataset, cfg.data.size, len(train_split), settings)
    rng = np.random.default_rng(1)
    augment = (lambda im: random_affine(im, tc.augment_shift, tc.augment_rotate, tc.augment_scale, rng)) if tc.augments else None

    def val_score(logits: torch.Tensor) -> float:
        scores = metrics.scores_from_logits(logits.numpy(), info)
        return selection_score(val_split.labels, scores, info, tc.class_weighting)[0]

    return T.cached_teacher(
        key, lambda: T.fit_teacher(train_split.images, train_split.targets, val_split.images, val_score, criterion,
                                   info.n_outputs, tc.teacher_epochs, 0, augment, say),
        T.channels_of(train_split.images), info.n_outputs)


def prepared_images(cfg: PipelineConfig, images=None, say: Callable[[str], None] = lambda _m: None,
                    progress: Callable[[int, int], None] | None = None):
    """``images`` if given, else the labelled images of ``cfg.data.images`` prepared (read, put
    through the upload path, augmented: :func:`engine.learn.labelled.training_images`), else None."""
    if images is not None or not cfg.data.images:
        return images
    from .labelled import training_images

    say(f"reading and augmenting the labelled images in {cfg.data.images}")
    return training_images(cfg.data, dataset_info(cfg.data.dataset), cfg.train.image_copies, cfg.train.seed,
                           progress=progress)


def renumbered(progress: ProgressFn | None, done: int, total: int, **fields) -> ProgressFn:
    """``progress`` for one of several trainings in a row: its epochs counted on from ``done`` of
    ``total`` (and ``fields`` set on each report)."""
    def report(r: EpochReport) -> None:
        if progress:
            progress(dataclasses.replace(r, epoch=done + r.epoch, epochs=total, **fields))
    return report


def train(cfg: PipelineConfig, progress: ProgressFn | None = None,
          say: Callable[[str], None] = lambda _m: None, images=None,
          image_progress: Callable[[int, int], None] | None = None) -> TrainResult:
    """Train a QAT FCNN per ``cfg``; keep the epoch with the best validation score.

    ``cfg.train.seeds > 1``: train that many runs (seeds ``seed``, ``seed + 1``, ...) and keep the
    one whose best epoch scored highest on validation, among those whose accumulators fit in
    :data:`NARROW_BITS` if any do (:func:`better`); ``progress`` counts epochs over all runs,
    and ``metrics["seeds"]`` lists each run's validation figures (the spread the choice removes).
    The labelled images are prepared once for all runs.
    """
    tc = cfg.train
    if tc.seeds <= 1:
        return _train_one(cfg, progress, say, images, image_progress)
    images = prepared_images(cfg, images, say, image_progress)
    best, runs = None, []
    for i in range(tc.seeds):
        seed = tc.seed + i
        say(f"run {i + 1} of {tc.seeds} (seed {seed})")
        counted = renumbered(progress, i * tc.epochs, tc.seeds * tc.epochs, seed=seed)
        one = _train_one(cfg.replace(train=dataclasses.replace(tc, seed=seed, seeds=1)), counted, say, images)
        runs.append({"seed": seed, "score": one.score, "best_epoch": one.best_epoch,
                     "val_accuracy": one.metrics["val"]["accuracy"], "val_auc": one.metrics["val"]["auc"],
                     "accumulator_bits": one.metrics["accumulator_bits"]})
        if better(one, best):
            best = one
    accs = [r["val_accuracy"] for r in runs]
    best.config = cfg  # what produced it: all the runs (the chosen seed is in the metrics)
    best.metrics["seeds"] = runs
    best.metrics["chosen_seed"] = best.history[0].seed if best.history else tc.seed
    best.metrics["seed_spread"] = max(accs) - min(accs)
    say(f"kept seed {best.metrics['chosen_seed']}: validation accuracy "
        + ", ".join(f"seed {r['seed']} {100 * r['val_accuracy']:.1f}% ({r['accumulator_bits']}-bit accumulators)"
                    for r in runs))
    return best


def _train_one(cfg: PipelineConfig, progress: ProgressFn | None = None,
               say: Callable[[str], None] = lambda _m: None, images=None,
               image_progress: Callable[[int, int], None] | None = None) -> TrainResult:
    """One run of :func:`train` with ``cfg.train.seed``.

    With ``cfg.data.images`` (or ``images``, a prepared :class:`engine.learn.labelled.TrainingImages`)
    the labelled images train too, as one of their real-upload versions each epoch, and their
    held-out part validates next to MedMNIST's validation split: an epoch competes on the mean of
    the two scores. ``cfg.data.images_only``: the images alone train."""
    tc = cfg.train
    seed_everything(tc.seed)
    val_split = load_split(cfg.data, "val")
    info = val_split.info
    images = prepared_images(cfg, images, say, image_progress)
    train_split = load_split(cfg.data, "train").head(tc.limit_train)
    if images is not None and cfg.data.images_only:
        train_split = train_split.subset(np.arange(0))
    own = images.train_index if images is not None else np.arange(0)
    own_labels = images.labels[own] if images is not None else np.zeros(0, np.int64)
    held = images.holdout_index if images is not None else np.arange(0)

    mc = cfg.model
    if len(train_split) + len(own) == 0:
        raise ValueError("nothing to train on: the labelled folder has no training image")
    norm = fit_norm(mc, [train_split.images] + ([images.clean[own]] if len(own) else []))

    def feat(im: np.ndarray) -> np.ndarray:
        return features(im, mc, norm)

    x_train = torch.from_numpy(feat(train_split.images))
    y_all = np.concatenate([train_split.targets, own_labels]) if len(own) else train_split.targets
    y_train = torch.from_numpy(y_all)
    x_val = feat(val_split.images)
    y_val = torch.from_numpy(val_split.targets)
    held_sets = held_out_sets(images, feat, tc.select_framed, info, cfg.data.size)
    x_held = np.concatenate([x for x, _y in held_sets]) if held_sets else None
    y_held = np.concatenate([y for _x, y in held_sets]) if held_sets else None

    model = build_model(x_val.shape[1], info.n_outputs, cfg.model)
    criterion = loss_fn(y_all, info, tc.class_weighting)
    val_criterion = loss_fn(val_split.targets, info, tc.class_weighting)
    opt = torch.optim.Adam(model.parameters(), lr=tc.lr, weight_decay=tc.weight_decay)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(tc.epochs, 1))
    gen = torch.Generator().manual_seed(tc.seed)
    aug_rng = np.random.default_rng(tc.seed)

    teacher = build_teacher(cfg, train_split, val_split, criterion, say) if tc.distill > 0 else None
    noise = RoundingNoise(model, cfg.compile.rounding_threshold_bits, tc.rounding_noise)
    soft = None  # the teacher's logits for this epoch's training images

    # The compiler's input set is stored with the model (calibration.npz): MedMNIST's training
    # images where the model learned from them, so that no image of one's own folder is stored
    # (a hospital's images stay where they are); the folder's only for a model trained on it alone.
    pool_images = train_split.images if len(train_split) else images.clean[own]
    calib_idx = np.random.default_rng(tc.seed).permutation(len(pool_images))[:CALIBRATION_SIZE]
    result = TrainResult(model=model, config=cfg, calibration=pool_images[np.sort(calib_idx)], feature_norm=norm)
    copy_rng = np.random.default_rng(tc.seed + 1)
    # each labelled training image's real-upload versions and the image as uploaded, gathered once,
    # and their features (a fixed transform of fixed images: computed once, not every epoch)
    versions_of_own = np.concatenate([images.copies[:, own], images.clean[own][None]]) if len(own) else None
    x_versions = (np.stack([feat(v.astype(np.float32)) for v in versions_of_own])
                  if versions_of_own is not None else None)
    best_score, best_state = -np.inf, None
    # With pruning: one dense epoch, then fine-tune under the mask; only masked epochs compete.
    # prune_epochs > 1: prune gradually, from that epoch on, each step keeping fewer inputs (cubic
    # schedule, Zhu & Gupta 2017), down to max_active_inputs.
    prune_epoch = (min(max(2, int(round(tc.prune_after * tc.epochs)) + 1), tc.epochs)
                   if cfg.model.max_active_inputs else 0)
    steps = min(max(tc.prune_epochs, 1), tc.epochs - prune_epoch + 1) if prune_epoch else 0
    for epoch in range(1, tc.epochs + 1):
        t0 = time.perf_counter()
        if prune_epoch and prune_epoch <= epoch < prune_epoch + steps:
            step = epoch - prune_epoch + 1
            model.apply_pruning(1.0 - (1.0 - step / steps) ** 3)
            if step == steps:  # only epochs at the final mask compete
                best_score, best_state = -np.inf, None
        model.train()
        moved = train_split.images
        x_medmnist = x_train[: len(train_split)]
        if tc.augments and len(train_split):
            moved = augment(train_split.images, tc, aug_rng)
            x_medmnist = torch.from_numpy(feat(moved))
            x_train = x_medmnist
        if len(own):  # each labelled image as one of its real-upload versions, or as it is
            pick = copy_rng.integers(0, len(versions_of_own), len(own))
            versions = versions_of_own[pick, np.arange(len(own))]
            moved = np.concatenate([np.asarray(moved, dtype=np.float32), versions.astype(np.float32)])
            x_train = torch.cat([x_medmnist, torch.from_numpy(x_versions[pick, np.arange(len(own))])])
        if teacher is not None and (soft is None or tc.augments):  # unmoved images: their logits once
            soft = teacher_logits(teacher, moved)
        perm = torch.randperm(len(x_train), generator=gen)
        total = 0.0
        with noise:
            for i in range(0, len(perm), tc.batch_size):
                idx = perm[i : i + tc.batch_size]
                out = model(x_train[idx])
                loss = criterion(out, y_train[idx])
                if soft is not None:
                    loss = (1 - tc.distill) * loss + tc.distill * distill_loss(
                        out, soft[idx], tc.distill_temperature, info.multi_label)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                total += loss.item() * len(idx)
        sched.step()

        logits = logits_of(model, x_val)
        scores = metrics.scores_from_logits(logits, info)
        val_loss = float(val_criterion(torch.from_numpy(logits), y_val))
        select, acc, bal = selection_score(val_split.labels, scores, info, tc.class_weighting)
        auc = metrics.auc(val_split.labels, scores, info)
        held_acc = None
        if x_held is not None:  # the labelled images' held-out part competes as much as MedMNIST's split
            held_scores = metrics.scores_from_logits(logits_of(model, x_held), info)
            held_select, held_acc, _ = selection_score(y_held.reshape(-1, 1), held_scores, info, tc.class_weighting)
            select = (select + held_select) / 2
        report = EpochReport(epoch, tc.epochs, total / len(perm), val_loss, acc, auc, time.perf_counter() - t0, bal,
                             held_acc, tc.seed)
        result.history.append(report)
        score = select + 1e-3 * (auc or 0.0)  # AUC breaks ties
        if score > best_score:
            best_score, best_state, result.best_epoch = score, copy.deepcopy(model.state_dict()), epoch
        if progress:
            progress(report)

    if best_state is not None:
        model.load_state_dict(best_state)
    result.score = float(best_score)
    model.remove_pruning()
    model.eval()

    if info.multi_label:
        val_scores = metrics.scores_from_logits(logits_of(model, x_val), info)
        result.thresholds = metrics.fit_label_thresholds(val_split.targets, val_scores).tolist()
    offset = None
    if tc.balance_decision and info.n_outputs == 2 and not info.multi_label:
        sets = [(x_val, val_split.targets), *held_sets]  # the held-out images, each framing apart
        offset = balance_decision(model, sets)
        say(f"decision balanced on {len(sets)} validation sets: logit offset {offset:+.1f}")
    if norm is not None and cfg.model.max_active_inputs:
        model, norm = read_only_used(model, norm)  # feat() and the metrics below use the smaller pair
        result.model, result.feature_norm = model, norm
    result.metrics = {
        "best_epoch": result.best_epoch,
        **({"decision_offset": offset} if offset is not None else {}),
        # the circuit's widest integer, estimated on the images the compiler calibrates on
        "accumulator_bits": model.accumulator_bits(torch.from_numpy(feat(result.calibration))),
        "val": evaluate_float(model, val_split, result.thresholds, norm),
        "test": evaluate_float(model, load_split(cfg.data, "test"), result.thresholds, norm),
    }
    medmnist_source = {"kind": "medmnist", "dataset": cfg.data.dataset, "split": "train", "files": len(train_split),
                       "train": {info.labels[c]: int((train_split.labels[:, 0] == c).sum()) for c in sorted(info.labels)}
                       if not info.multi_label else None}
    result.sources = ([medmnist_source] if len(train_split) else [])
    if images is not None:
        result.images = images
        result.sources.append(images.provenance(info))
        held_split = Split(cfg.data.dataset, "holdout", images.clean[held], images.labels[held].reshape(-1, 1), info)
        if len(held):
            result.metrics["holdout"] = evaluate_float(model, held_split, result.thresholds, norm)
    return result
