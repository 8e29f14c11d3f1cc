"""Operating points: a hospital chooses the threshold its answers are decided with, on its own
labelled images, and every answer says which it uses.

The client holds the decrypted scores: choosing a threshold there changes nothing on the server
and reveals nothing to it. For a binary dataset the threshold applies to the calibrated
probability of the dataset's *finding* (:data:`FINDINGS`: pneumonia in PneumoniaMNIST, malignant
in BreastMNIST): an image is answered with the finding when that probability reaches the
threshold. An optional *refer band* ``[low, high)`` answers "refer to a radiologist" instead of a
class. A point is a small JSON file kept by the client, tied to one model's content hash.

The figures (ROC and precision-recall curves, AUC, sensitivity, specificity, PPV and NPV at
candidate thresholds) carry 95% bootstrap confidence intervals: on a few hundred images they are
tens of points wide, and the report says how many images they rest on.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

# The finding of each binary dataset: the class a screening site must not miss (its recall is
# the sensitivity). Other binary datasets: label 1.
FINDINGS = {"pneumoniamnist": 1, "breastmnist": 0}
CANDIDATES = tuple(round(t, 2) for t in np.arange(0.05, 0.951, 0.05))  # thresholds the table shows
BOOTSTRAP = 1000
REFER = "refer to a radiologist"
UNCERTAIN = "uncertain (flagged)"  # a flagged input's answer, whatever the point


class PointError(ValueError):
    """An operating point that cannot be used here (another model, a broken file, not binary)."""


def finding_of(dataset: str, info) -> int:
    if info.n_outputs != 2 or info.multi_label:
        raise PointError(f"{dataset} has {info.n_outputs} classes: an operating point needs a binary dataset")
    return FINDINGS.get(dataset, 1)


def calibrated_scores(logits: np.ndarray, info, guard=None) -> np.ndarray:
    """Class probabilities as the answers show them: the model's guard's temperature applied where
    there is one (its calibrated confidence), else the plain softmax."""
    from ..learn import metrics

    z = np.asarray(logits, dtype=np.float64).reshape(len(logits), -1)
    return metrics.scores_from_logits(z / (guard.temperature if guard is not None else 1.0), info)


def finding_probability(logits: np.ndarray, finding: int, info, guard=None) -> np.ndarray:
    """The (calibrated) probability of the finding for each row of ``logits``."""
    return calibrated_scores(logits, info, guard)[:, finding]


# -- figures with their uncertainty
def _rates(pos: np.ndarray, decided: np.ndarray, w: np.ndarray) -> dict[str, np.ndarray]:
    """Sensitivity, specificity, PPV, NPV for each row of ``decided`` (thresholds x images) and
    each row of the weights ``w`` (draws x images): arrays (draws x thresholds)."""
    tp, fn = w @ (decided & pos).T, w @ (~decided & pos).T
    fp, tn = w @ (decided & ~pos).T, w @ (~decided & ~pos).T
    with np.errstate(invalid="ignore", divide="ignore"):
        return {"sensitivity": tp / (tp + fn), "specificity": tn / (tn + fp), "ppv": tp / (tp + fp), "npv": tn / (tn + fn)}


def _draws(n: int, boot: int, seed: int) -> np.ndarray:
    """Bootstrap weights: how often each image is drawn in each of ``boot`` resamples (row 0: the images as they are)."""
    rng = np.random.default_rng(seed)
    w = np.stack([np.bincount(rng.integers(0, n, n), minlength=n) for _ in range(boot)]).astype(np.float64)
    return np.vstack([np.ones(n), w])


def _auc(pos: np.ndarray, p: np.ndarray, w: np.ndarray) -> np.ndarray:
    """The weighted AUC (Mann-Whitney: a positive scored above a negative counts 1, alike a half)
    for each row of the weights ``w``."""
    _, which = np.unique(p, return_inverse=True)
    onehot = np.zeros((len(p), which.max() + 1))
    onehot[np.arange(len(p)), which] = 1.0
    wp, wn = (w * pos) @ onehot, (w * ~pos) @ onehot  # (draws x distinct scores), ascending
    below = np.cumsum(wn, axis=1) - wn
    with np.errstate(invalid="ignore", divide="ignore"):
        return (wp * (below + wn / 2)).sum(axis=1) / (wp.sum(axis=1) * wn.sum(axis=1))


def _interval(values: np.ndarray) -> list[float | None]:
    v = values[np.isfinite(values)]
    return [float(np.percentile(v, 2.5)), float(np.percentile(v, 97.5))] if len(v) else [None, None]


def _value(v: float) -> float | None:
    return None if not np.isfinite(v) else float(v)


def at_thresholds(labels: np.ndarray, p: np.ndarray, finding: int, thresholds, boot: int = BOOTSTRAP,
                  seed: int = 0, draws: np.ndarray | None = None) -> list[dict]:
    """Sensitivity, specificity, PPV and NPV at each threshold, each with its 95% bootstrap
    interval (``draws``: the resamples' weights, when the caller has them already)."""
    pos = np.asarray(labels).reshape(-1) == finding
    thresholds = np.asarray(list(thresholds), dtype=np.float64)
    decided = p[None, :] >= thresholds[:, None]
    rates = _rates(pos, decided, draws if draws is not None else _draws(len(p), boot, seed))
    return [{"threshold": float(t), **{k: _value(r[0, i]) for k, r in rates.items()},
             **{f"{k}_ci": _interval(r[1:, i]) for k, r in rates.items()},
             "finding_answers": int(decided[i].sum())} for i, t in enumerate(thresholds)]


def curves(labels: np.ndarray, p: np.ndarray, finding: int, boot: int = BOOTSTRAP, seed: int = 0) -> dict:
    """ROC and precision-recall curves of the finding, the AUC with its 95% bootstrap interval,
    and the table at :data:`CANDIDATES`."""
    from sklearn.metrics import precision_recall_curve, roc_curve

    pos = np.asarray(labels).reshape(-1) == finding
    n_pos, n_neg = int(pos.sum()), int((~pos).sum())
    out = {"finding": int(finding), "n": int(len(p)), "positives": n_pos, "negatives": n_neg, "bootstrap": boot}
    draws = _draws(len(p), boot, seed)
    table = at_thresholds(labels, p, finding, CANDIDATES, draws=draws)
    if not n_pos or not n_neg:
        return {**out, "auc": None, "auc_ci": [None, None], "roc": None, "pr": None, "table": table}
    aucs = _auc(pos, p, draws)
    fpr, tpr, thr = roc_curve(pos, p)
    precision, recall, pr_thr = precision_recall_curve(pos, p)
    return {**out, "auc": _value(aucs[0]), "auc_ci": _interval(aucs[1:]),
            "roc": {"fpr": fpr.tolist(), "tpr": tpr.tolist(), "thresholds": np.minimum(thr, 1.0).tolist()},
            "pr": {"precision": precision.tolist(), "recall": recall.tolist(), "thresholds": pr_thr.tolist()},
            "table": table}


def choose(labels: np.ndarray, p: np.ndarray, finding: int, target_recall: float | None = None,
           target_specificity: float | None = None) -> float:
    """The threshold that meets the target on these images: for a recall target, the highest
    threshold whose sensitivity reaches it (the fewest false alarms); for a specificity target,
    the lowest whose specificity reaches it (the most findings)."""
    if (target_recall is None) == (target_specificity is None):
        raise PointError("give one target: a recall or a specificity")
    target = target_recall if target_recall is not None else target_specificity
    if not 0 < target <= 1:
        raise PointError(f"a target is a share between 0 and 1, not {target}")
    pos = np.asarray(labels).reshape(-1) == finding
    if not pos.any() or pos.all():
        raise PointError("choosing a point needs images of both classes")
    candidates = np.unique(p)  # every distinct score: the decision changes only there
    decided = p[None, :] >= candidates[:, None]
    sens = (decided & pos).sum(1) / pos.sum()
    spec = (~decided & ~pos).sum(1) / (~pos).sum()
    if target_recall is not None:
        ok = np.flatnonzero(sens >= target_recall)
        return float(candidates[ok.max()])
    ok = np.flatnonzero(spec >= target_specificity)
    if not len(ok):  # above every score: nothing is called a finding
        return float(np.nextafter(candidates.max(), np.inf))
    return float(candidates[ok.min()])


# -- the point itself
def images_hash(files) -> str:
    """A content hash of labelled files (their names, labels and bytes), independent of their order."""
    h = hashlib.sha256()
    for name, label, digest in sorted((f.name, int(f.label), hashlib.sha256(f.data or b"").hexdigest()) for f in files):
        h.update(f"{name}\0{label}\0{digest}\n".encode())
    return h.hexdigest()


@dataclass
class OperatingPoint:
    dataset: str
    model: str
    model_hash: str
    finding: int
    finding_name: str
    other_name: str
    threshold: float  # the finding when its probability reaches this
    chosen_by: str  # e.g. "recall >= 0.95"
    refer: list[float] | None = None  # [low, high): answered "refer to a radiologist"
    calibrated: bool = True  # the probability is the guard's calibrated one (else the softmax)
    images: dict = field(default_factory=dict)  # n, positives, negatives, content_hash, source
    figures: dict = field(default_factory=dict)  # sensitivity, specificity, ... with intervals, on those images
    date: str = ""
    version: int = 1

    def __post_init__(self) -> None:
        if not 0 <= self.threshold <= 1:
            raise PointError(f"threshold {self.threshold} is not a probability")
        if self.refer is not None:
            lo, hi = (float(v) for v in self.refer)
            if not 0 <= lo < hi <= 1:
                raise PointError(f"refer band {self.refer}: give two probabilities, low < high")
            self.refer = [lo, hi]

    # -- deciding
    def probability(self, logits: np.ndarray, info, guard=None) -> np.ndarray:
        """The finding's probability for each row of ``logits``, as this point was chosen on
        (calibrated by ``guard`` when the point was)."""
        return finding_probability(logits, self.finding, info, guard if self.calibrated else None)

    def decide(self, p_finding: float) -> int | None:
        """The class decided for a finding probability, or None: refer."""
        if self.refer is not None and self.refer[0] <= p_finding < self.refer[1]:
            return None
        return self.finding if p_finding >= self.threshold else 1 - self.finding

    def describe(self) -> str:
        band = f"; refer band {self.refer[0]:.2f}-{self.refer[1]:.2f}" if self.refer else ""
        return (f"operating point: {self.finding_name} when P({self.finding_name}) >= {self.threshold:.3f} "
                f"({self.chosen_by}){band}")

    def answer(self, p_finding: float, names: dict[int, str], flagged: bool = False) -> str:
        """The answer at this point, as every face shows it: a class, :data:`REFER`, or
        :data:`UNCERTAIN` for an input the check flagged."""
        if flagged:
            return UNCERTAIN
        c = self.decide(p_finding)
        return REFER if c is None else names[c]

    # -- storage
    def check(self, saved) -> "OperatingPoint":
        """This point if it was made for ``saved`` (its content hash), else a :class:`PointError`."""
        if self.model_hash != saved.hash or self.dataset != saved.dataset:
            raise PointError(f"this operating point was chosen for {self.dataset}/{self.model} (model hash "
                             f"{self.model_hash[:12]}), not for {saved.dataset}/{saved.name} ({saved.hash[:12]}): "
                             "choose a point for this model on your labelled images")
        return self

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(self.to_json())
        return path

    @classmethod
    def from_json(cls, text: str) -> "OperatingPoint":
        try:
            d = json.loads(text)
            names = {f.name for f in cls.__dataclass_fields__.values()}
            return cls(**{k: v for k, v in d.items() if k in names})
        except PointError:
            raise
        except (ValueError, TypeError, AttributeError) as exc:
            raise PointError(f"not an operating point file: {exc}") from None

    @classmethod
    def load(cls, path: str | Path) -> "OperatingPoint":
        try:
            text = Path(path).read_text()
        except OSError as exc:
            raise PointError(f"cannot read the operating point {path}: {exc.strerror or exc}") from None
        return cls.from_json(text)


def make_point(saved, info, labels: np.ndarray, p: np.ndarray, files, target_recall: float | None = None,
               target_specificity: float | None = None, refer: list[float] | None = None, calibrated: bool = True,
               source: str = "", threshold: float | None = None) -> OperatingPoint:
    """The point meeting the target on these images (or at ``threshold``, a row of the table
    picked), with its figures there and their intervals."""
    finding = finding_of(saved.dataset, info)
    if threshold is not None:
        if target_recall is not None or target_specificity is not None:
            raise PointError("give a target or a threshold, not both")
        by = f"picked from the table at {threshold:g}"
    else:
        threshold = choose(labels, p, finding, target_recall, target_specificity)
        by = f"recall >= {target_recall:g}" if target_recall is not None else f"specificity >= {target_specificity:g}"
    pos = np.asarray(labels).reshape(-1) == finding
    figures = at_thresholds(labels, p, finding, [threshold])[0]
    return OperatingPoint(
        dataset=saved.dataset, model=saved.name, model_hash=saved.hash, finding=finding,
        finding_name=info.labels[finding], other_name=info.labels[1 - finding], threshold=threshold, chosen_by=by,
        refer=refer, calibrated=calibrated,
        images={"n": int(len(p)), "positives": int(pos.sum()), "negatives": int((~pos).sum()),
                "content_hash": images_hash(files), "source": source},
        figures=figures, date=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"))


def audit(point: OperatingPoint, labels: np.ndarray, p: np.ndarray) -> dict:
    """The figures at ``point`` on these images (what a department audits): sensitivity,
    specificity, PPV, NPV with intervals over the images not referred, and how many were referred."""
    decided = np.asarray([point.decide(float(v)) for v in p], dtype=object)
    referred = np.asarray([d is None for d in decided])
    keep = ~referred
    figures = (at_thresholds(np.asarray(labels).reshape(-1)[keep], p[keep], point.finding, [point.threshold])[0]
               if keep.any() else {})
    return {"point": asdict(point), "referred": int(referred.sum()), "answered": int(keep.sum()), **figures}
