"""Task-aware scores, predictions and metrics (medmnist's own ACC/AUC where they apply)."""

from __future__ import annotations

import numpy as np

from .data import DatasetInfo


def scores_from_logits(logits: np.ndarray, info: DatasetInfo) -> np.ndarray:
    """Logits -> class probabilities (softmax) or per-label probabilities (sigmoid)."""
    z = np.asarray(logits, dtype=np.float64)
    if info.multi_label:
        return 1.0 / (1.0 + np.exp(-z))
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def predict(scores: np.ndarray, info: DatasetInfo, thresholds: np.ndarray | None = None) -> np.ndarray:
    """Class index (N,) or 0/1 label matrix (N, L) with per-label thresholds."""
    if info.multi_label:
        t = 0.5 if thresholds is None else np.asarray(thresholds)
        return (scores >= t).astype(np.int64)
    return scores.argmax(axis=1)


def label_text(info: DatasetInfo, pred) -> str:
    """A prediction or target as text: the class name, or the '+'-joined positive labels."""
    if info.multi_label:
        on = [info.labels[j] for j in np.flatnonzero(np.asarray(pred))]
        return "+".join(on) if on else "none"
    return info.labels[int(pred)]


def accuracy(y_true: np.ndarray, scores: np.ndarray, info: DatasetInfo, thresholds=None) -> float:
    if info.multi_label and thresholds is not None:
        pred = predict(scores, info, thresholds)
        return float((pred == y_true.reshape(pred.shape)).mean(axis=0).mean())
    if len(scores) == 1 and not info.multi_label:  # medmnist's getACC squeezes one image to a scalar
        return float(predict(scores, info)[0] == int(np.asarray(y_true).reshape(-1)[0]))
    from medmnist.evaluator import getACC  # imported here: medmnist's package loads torch and scikit-learn

    return float(getACC(np.asarray(y_true).reshape(len(scores), -1), scores, info.task))


def balanced_accuracy(y_true: np.ndarray, scores: np.ndarray, info: DatasetInfo) -> float | None:
    """Mean per-class recall of the argmax prediction (single-label tasks; None otherwise)."""
    if info.multi_label:
        return None
    from sklearn.metrics import balanced_accuracy_score

    return float(balanced_accuracy_score(np.asarray(y_true).reshape(-1), scores.argmax(axis=1)))


def auc(y_true: np.ndarray, scores: np.ndarray, info: DatasetInfo) -> float | None:
    """medmnist's AUC, or None where it is undefined (a class missing from the sample)."""
    y = np.asarray(y_true).reshape(len(scores), -1)
    if info.multi_label:
        if any(len(np.unique(y[:, i])) < 2 for i in range(y.shape[1])):
            return None
    elif len(np.unique(y)) < 2:
        return None
    try:
        from medmnist.evaluator import getAUC

        return float(getAUC(y, scores, info.task))
    except ValueError:
        return None


def fit_label_thresholds(y_true: np.ndarray, scores: np.ndarray) -> np.ndarray:
    """Per-label threshold maximising accuracy on (validation) data, for multi-label tasks."""
    grid = np.linspace(0.05, 0.95, 19)
    best = []
    for i in range(scores.shape[1]):
        accs = [((scores[:, i] >= t) == y_true[:, i]).mean() for t in grid]
        best.append(grid[int(np.argmax(accs))])
    return np.asarray(best)
