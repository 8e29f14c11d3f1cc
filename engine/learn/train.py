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
from ..config import PipelineConfig, TrainConfig
from .augment import random_affine
from .data import Split, load_split
from .features import FeatureNorm, features
from .model import QATFCNN, build_model
from .losses import RoundingNoise, distill_loss, loss_fn
from .teacher import teacher_logits
from .trainset import TrainingSet, prepared_images, training_set


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

    # Training a new teacher draws from torch's global generator (the student's noise draws next):
    # forked, so that a run gives the same student whether its teacher was cached or trained now.
    with torch.random.fork_rng(devices=[]):
        return T.cached_teacher(
            key, lambda: T.fit_teacher(train_split.images, train_split.targets, val_split.images, val_score, criterion,
                                           info.n_outputs, tc.teacher_epochs, 0, augment, say),
            T.channels_of(train_split.images), info.n_outputs)


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


class PruneSchedule:
    """With pruning: one dense epoch, then fine-tune under the mask; only masked epochs compete.
    ``prune_epochs`` > 1: prune gradually, from that epoch on, each step keeping fewer inputs
    (cubic schedule, Zhu & Gupta 2017), down to ``max_active_inputs``."""

    def __init__(self, cfg: PipelineConfig):
        tc = cfg.train
        self.first = (min(max(2, int(round(tc.prune_after * tc.epochs)) + 1), tc.epochs)
                      if cfg.model.max_active_inputs else 0)
        self.steps = min(max(tc.prune_epochs, 1), tc.epochs - self.first + 1) if self.first else 0

    def step(self, model: QATFCNN, epoch: int) -> bool:
        """Prune for ``epoch``; whether the final mask starts now (the epochs before stop competing)."""
        if not (self.first and self.first <= epoch < self.first + self.steps):
            return False
        step = epoch - self.first + 1
        model.apply_pruning(1.0 - (1.0 - step / self.steps) ** 3)
        return step == self.steps


def fit_epoch(model: QATFCNN, x: torch.Tensor, y: torch.Tensor, soft: torch.Tensor | None, criterion: nn.Module,
              opt: torch.optim.Optimizer, gen: torch.Generator, noise: RoundingNoise, tc: TrainConfig,
              multi_label: bool) -> float:
    """One pass over ``x`` in shuffled batches, the teacher's ``soft`` logits mixed in; the mean loss."""
    perm = torch.randperm(len(x), generator=gen)
    total = 0.0
    with noise:
        for i in range(0, len(perm), tc.batch_size):
            idx = perm[i : i + tc.batch_size]
            out = model(x[idx])
            loss = criterion(out, y[idx])
            if soft is not None:
                loss = (1 - tc.distill) * loss + tc.distill * distill_loss(out, soft[idx], tc.distill_temperature,
                                                                           multi_label)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += loss.item() * len(idx)
    return total / len(perm)


class Validation:
    """What an epoch competes on: MedMNIST's validation split and, where there are labelled images,
    their held-out part (every framing), as much as MedMNIST's split; AUC breaks ties."""

    def __init__(self, ts: TrainingSet, tc: TrainConfig):
        self.ts, self.tc = ts, tc
        self.criterion = loss_fn(ts.val_split.targets, ts.info, tc.class_weighting)
        self.y_val = torch.from_numpy(ts.val_split.targets)
        self.x_held, self.y_held = ts.held_x, ts.held_y

    def __call__(self, model: QATFCNN, epoch: int, train_loss: float, t0: float) -> tuple[EpochReport, float]:
        ts, tc, info = self.ts, self.tc, self.ts.info
        logits = logits_of(model, ts.x_val)
        scores = metrics.scores_from_logits(logits, info)
        val_loss = float(self.criterion(torch.from_numpy(logits), self.y_val))
        select, acc, bal = selection_score(ts.val_split.labels, scores, info, tc.class_weighting)
        auc = metrics.auc(ts.val_split.labels, scores, info)
        held_acc = None
        if self.x_held is not None:
            held_scores = metrics.scores_from_logits(logits_of(model, self.x_held), info)
            held_select, held_acc, _ = selection_score(self.y_held.reshape(-1, 1), held_scores, info, tc.class_weighting)
            select = (select + held_select) / 2
        report = EpochReport(epoch, tc.epochs, train_loss, val_loss, acc, auc, time.perf_counter() - t0, bal,
                             held_acc, tc.seed)
        return report, select + 1e-3 * (auc or 0.0)


def _train_one(cfg: PipelineConfig, progress: ProgressFn | None = None,
               say: Callable[[str], None] = lambda _m: None, images=None,
               image_progress: Callable[[int, int], None] | None = None) -> TrainResult:
    """One run of :func:`train` with ``cfg.train.seed``: what it reads (:func:`training_set`), a
    plain loop over epochs keeping the best on validation, then :func:`finish`.

    With labelled images, each trains as one of its real-upload versions each epoch, and their
    held-out part validates next to MedMNIST's validation split (:class:`Validation`)."""
    tc = cfg.train
    seed_everything(tc.seed)
    ts = training_set(cfg, images, say, image_progress)
    info = ts.info
    model = build_model(ts.x_val.shape[1], info.n_outputs, cfg.model)
    criterion = loss_fn(ts.y_all, info, tc.class_weighting)
    validate = Validation(ts, tc)
    opt = torch.optim.Adam(model.parameters(), lr=tc.lr, weight_decay=tc.weight_decay)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(tc.epochs, 1))
    gen = torch.Generator().manual_seed(tc.seed)
    aug_rng, copy_rng = np.random.default_rng(tc.seed), np.random.default_rng(tc.seed + 1)
    teacher = build_teacher(cfg, ts.train_split, ts.val_split, criterion, say) if tc.distill > 0 else None
    noise = RoundingNoise(model, cfg.compile.rounding_threshold_bits, tc.rounding_noise)
    prune = PruneSchedule(cfg)
    result = TrainResult(model=model, config=cfg, calibration=ts.calibration, feature_norm=ts.norm)
    best_score, best_state, soft = -np.inf, None, None  # soft: the teacher's logits for this epoch's images
    for epoch in range(1, tc.epochs + 1):
        t0 = time.perf_counter()
        if prune.step(model, epoch):  # only epochs at the final mask compete
            best_score, best_state = -np.inf, None
        model.train()
        x_train, moved = ts.epoch_inputs(tc, aug_rng, copy_rng)
        if teacher is not None and (soft is None or tc.augments):  # unmoved images: their logits once
            soft = teacher_logits(teacher, moved)
        train_loss = fit_epoch(model, x_train, ts.y_train, soft, criterion, opt, gen, noise, tc, info.multi_label)
        sched.step()
        report, score = validate(model, epoch, train_loss, t0)
        result.history.append(report)
        if score > best_score:
            best_score, best_state, result.best_epoch = score, copy.deepcopy(model.state_dict()), epoch
        if progress:
            progress(report)
    if best_state is not None:
        model.load_state_dict(best_state)
    result.score = float(best_score)
    return finish(result, ts, cfg, say)


def finish(result: TrainResult, ts: TrainingSet, cfg: PipelineConfig,
           say: Callable[[str], None] = lambda _m: None) -> TrainResult:
    """The best epoch's model made final: pruning masks folded in, label thresholds (multi-label),
    the decision balanced (binary), the inputs no neuron reads dropped; its metrics and provenance."""
    model, info, tc = result.model, ts.info, cfg.train
    model.remove_pruning()
    model.eval()
    if info.multi_label:
        val_scores = metrics.scores_from_logits(logits_of(model, ts.x_val), info)
        result.thresholds = metrics.fit_label_thresholds(ts.val_split.targets, val_scores).tolist()
    offset = None
    if tc.balance_decision and info.n_outputs == 2 and not info.multi_label:
        sets = [(ts.x_val, ts.val_split.targets), *ts.held_sets]  # the held-out images, each framing apart
        offset = balance_decision(model, sets)
        say(f"decision balanced on {len(sets)} validation sets: logit offset {offset:+.1f}")
    if ts.norm is not None and cfg.model.max_active_inputs:
        model, ts.norm = read_only_used(model, ts.norm)  # ts.feat and the metrics below use the smaller pair
        result.model, result.feature_norm = model, ts.norm
    result.metrics = {
        "best_epoch": result.best_epoch,
        **({"decision_offset": offset} if offset is not None else {}),
        # the circuit's widest integer, estimated on the images the compiler calibrates on
        "accumulator_bits": model.accumulator_bits(torch.from_numpy(ts.feat(result.calibration))),
        "val": evaluate_float(model, ts.val_split, result.thresholds, ts.norm),
        "test": evaluate_float(model, load_split(cfg.data, "test"), result.thresholds, ts.norm),
    }
    train_split, images = ts.train_split, ts.images
    medmnist_source = {"kind": "medmnist", "dataset": cfg.data.dataset, "split": "train", "files": len(train_split),
                       "train": {info.labels[c]: int((train_split.labels[:, 0] == c).sum()) for c in sorted(info.labels)}
                       if not info.multi_label else None}
    result.sources = ([medmnist_source] if len(train_split) else [])
    if images is not None:
        result.images = images
        result.sources.append(images.provenance(info))
        if len(ts.held):
            held_split = Split(cfg.data.dataset, "holdout", images.clean[ts.held], images.labels[ts.held].reshape(-1, 1), info)
            result.metrics["holdout"] = evaluate_float(model, held_split, result.thresholds, ts.norm)
    return result
