"""Validation on one's own labelled images: a folder (or ``.zip``) with one subfolder per class,
put through exactly the upload path (decode, crop and resize, the input check, the calibrated
confidence, encryption in ``fhe`` mode), with the figures a hospital checks a model by.

Folder names match the dataset's label names case-insensitively (or any comma-separated part
of one: BreastMNIST's ``normal, benign`` takes ``normal`` and ``benign``), or label indices;
a label map (``NORMAL=0,PNEUMONIA=1``) names others.
"""

from __future__ import annotations

from itertools import combinations

import numpy as np

from ..learn import metrics
from ..learn.data import DatasetInfo
from ..learn.guard import CONFIDENT, Guard  # CONFIDENT: answers at this confidence are counted apart
from ..learn.screening import Screened, screen
from ..learn.images import ImageError
# The labelled folder is read by the learn wing (training reads it the same way); re-exported here.
from ..learn.labelled import LabelError, LabelledFile, label_of, parse_label_map, read_labelled  # noqa: F401
from .evaluate import agreement

RELIABILITY_BINS = (0.5, 0.6, 0.7, 0.8, 0.9, 1.0)


def screen_labelled(files: list[LabelledFile], guard: Guard | None, size: int, channels: int) -> list[Screened]:
    """Each file decoded into the model's input and checked, exactly as an upload is."""
    out = []
    for f in files:
        if f.error is not None:
            out.append(Screened(f.name, None, None, None, error=f.error))
        else:
            try:
                out.extend(screen([(f.name, f.data)], guard, size, channels))
            except ImageError as exc:
                out.append(Screened(f.name, None, None, None, error=str(exc)))
    return out


def class_report(labels: np.ndarray, logits: np.ndarray, info: DatasetInfo) -> dict:
    """Accuracy, balanced accuracy, AUC, per-class recall and the confusion matrix (rows: true)."""
    scores = metrics.scores_from_logits(logits, info)
    pred = scores.argmax(axis=1)
    k = info.n_outputs
    confusion = np.zeros((k, k), dtype=int)
    np.add.at(confusion, (labels, pred), 1)
    present = [c for c in range(k) if confusion[c].sum()]
    return {
        "n": int(len(labels)),
        "accuracy": float((pred == labels).mean()) if len(labels) else None,
        "balanced_accuracy": float(np.mean([confusion[c, c] / confusion[c].sum() for c in present])) if present else None,
        "auc": metrics.auc(labels.reshape(-1, 1), scores, info) if len(labels) else None,
        "recall": {info.labels[c]: (float(confusion[c, c] / confusion[c].sum()) if confusion[c].sum() else None)
                   for c in range(k)},
        "confusion": confusion.tolist(),
    }


def _accuracy(mask: np.ndarray, right: np.ndarray) -> float | None:
    return float(right[mask].mean()) if mask.any() else None


def reliability(confidence: np.ndarray, right: np.ndarray, bins=RELIABILITY_BINS) -> list[dict]:
    """Accuracy per calibrated-confidence bin (what the reliability diagram draws)."""
    out = []
    for lo, hi in zip(bins[:-1], bins[1:]):
        m = (confidence >= lo) & ((confidence < hi) | (hi == bins[-1]))
        out.append({"from": lo, "to": hi, "n": int(m.sum()), "accuracy": _accuracy(m, right),
                    "mean_confidence": float(confidence[m].mean()) if m.any() else None})
    return out


def calibration_error(confidence: np.ndarray, right: np.ndarray, bins: int = 10) -> float | None:
    """Expected calibration error (Guo et al., 2017): the gap between confidence and accuracy in
    ``bins`` equal-width confidence bins, weighted by their share of the answers."""
    confidence, right = np.asarray(confidence, dtype=np.float64), np.asarray(right, dtype=np.float64)
    if not len(confidence):
        return None
    edges = np.linspace(0, 1, bins + 1)
    which = np.clip(np.digitize(confidence, edges[1:-1]), 0, bins - 1)
    return float(sum(abs(confidence[which == b].mean() - right[which == b].mean()) * (which == b).mean()
                     for b in range(bins) if (which == b).any()))


def validate(predictor, guard: Guard | None, files: list[LabelledFile], modes, progress=None,
             source: str = "", point=None) -> dict:
    """The report on ``files`` (see the module docstring): per mode, and per image for the last
    mode given (the answer the user would get). Binary datasets: the ROC and precision-recall
    curves of the finding with 95% bootstrap intervals (``operating``); with ``point`` (an
    :class:`engine.study.operating.OperatingPoint` made for this model) the figures at that point
    and each image's decision there (``at_point``), else the answers are argmax, as ``decided_by`` says."""
    from .infer import parse_modes

    modes = parse_modes(modes)
    info, saved = predictor.info, predictor.saved
    items = screen_labelled(files, guard, saved.config.data.size, info.n_channels)
    labels_all = {f.name: f.label for f in files}
    good = [it for it in items if it.error is None]
    labels = np.asarray([labels_all[it.name] for it in good], dtype=np.int64)
    results = predictor.run(np.stack([it.image for it in good]), modes, progress) if good else {}
    report = {"dataset": saved.dataset, "model": saved.name, "model_hash": saved.hash, "source": source,
              "labels": {int(k): v for k, v in info.labels.items()}, "files": len(items), "n": len(good),
              "unreadable": [{"file": it.name, "reason": it.error} for it in items if it.error is not None],
              "modes": {m: class_report(labels, r.logits, info) for m, r in results.items()},
              "agreement": {f"{a}_{b}": agreement(results[a], results[b]) for a, b in combinations(results, 2)}}
    if not results:
        return report
    last = results[modes[-1]]
    pred = last.predictions.reshape(-1)
    right = pred == labels
    confs = [guard.confidence(z, it.verdict) if guard is not None else None for z, it in zip(last.logits, good)]
    # a flagged image gets no confidence: it counts as 0 (never among the confident answers)
    conf = np.asarray([(c.shown or 0.0) if c is not None else float(np.max(s)) for c, s in zip(confs, last.scores)])
    uncertain = [c.uncertain if c is not None else None for c in confs]
    flagged = np.asarray([bool(it.verdict is not None and it.verdict.foreign) for it in good])
    confident = conf >= CONFIDENT
    report.update({
        "answer_mode": modes[-1],
        "calibrated": guard is not None,
        "flagged_share": float(flagged.mean()),
        "accuracy_flagged": _accuracy(flagged, right),
        "accuracy_passed": _accuracy(~flagged, right),
        "confident_share": float(confident.mean()),
        "accuracy_confident": _accuracy(confident, right),
        "reliability": reliability(conf, right),
        # over the answers given a confidence (a flagged image gets none)
        "ece": calibration_error(conf[~flagged], right[~flagged]),
        "images": [{"file": it.name, "label": int(y), "label_name": info.labels[int(y)], "prediction": int(p),
                    "prediction_name": info.labels[int(p)], "right": bool(p == y), "confidence": None if f else round(float(c), 4),
                    "uncertain": u, "flagged": bool(f),
                    "warning": it.verdict.message if it.verdict is not None and it.verdict.foreign else ""}
                   for it, y, p, c, u, f in zip(good, labels, pred, conf, uncertain, flagged)],
    })
    if "fhe" in results:
        report["latency_median_s"] = float(np.median(results["fhe"].latency_s))
    _operating(report, saved, info, guard, labels, last.logits, point)
    return report


def _operating(report: dict, saved, info: DatasetInfo, guard: Guard | None, labels: np.ndarray, logits: np.ndarray,
               point) -> None:
    """The ROC part of the report, and the figures and decisions at ``point``."""
    from . import operating

    report["decided_by"] = point.describe() if point is not None else "argmax (no operating point)"
    if info.multi_label:
        return
    if info.n_outputs != 2:  # one class against the rest, each with its curve and intervals (no point)
        scores = operating.calibrated_scores(logits, info, guard)
        report["one_vs_rest"] = {info.labels[c]: operating.curves(labels, scores[:, c], c) for c in range(info.n_outputs)}
        return
    finding = operating.finding_of(saved.dataset, info)
    p = point.probability(logits, info, guard) if point is not None else operating.finding_probability(logits, finding, info, guard)
    report["operating"] = operating.curves(labels, p, finding)
    for row, v in zip(report["images"], p):
        row["finding_probability"] = round(float(v), 6)
    if point is None:
        return
    report["at_point"] = operating.audit(point, labels, p)
    for row, v in zip(report["images"], p):
        row["decision"] = point.answer(float(v), info.labels, row["flagged"])


def pct(v) -> str:
    return "-" if v is None else f"{100 * v:.1f}%"


def table(report: dict) -> str:
    """The report as text (what ``evaluate --images`` prints)."""
    lines = [f"{report['dataset']} / {report['model']} on {report['n']} labelled images from {report['source']}"
             + (f" ({len(report['unreadable'])} unreadable)" if report["unreadable"] else "")]
    names = list(report["labels"].values())
    for mode, m in report["modes"].items():
        recall = ", ".join(f"{k} {pct(v)}" for k, v in m["recall"].items())
        auc = "-" if m["auc"] is None else f"{m['auc']:.3f}"
        lines.append(f"{mode}: accuracy {pct(m['accuracy'])}, balanced {pct(m['balanced_accuracy'])}, AUC {auc}; "
                     f"recall: {recall}")
    if "images" in report:
        m = report["modes"][report["answer_mode"]]
        width = max(len(n) for n in names) + 2
        lines.append(f"confusion matrix ({report['answer_mode']}; rows: true, columns: predicted)")
        lines.append(" " * width + "".join(n[: width - 1].rjust(width) for n in names))
        lines += [n.ljust(width) + "".join(str(v).rjust(width) for v in row) for n, row in zip(names, m["confusion"])]
        lines.append(f"flagged as unlike the training images: {pct(report['flagged_share'])} "
                     f"(accuracy flagged {pct(report['accuracy_flagged'])}, passed {pct(report['accuracy_passed'])})")
        kind = "calibrated " if report["calibrated"] else "uncalibrated "
        lines.append(f"answers at {kind}confidence >= {100 * CONFIDENT:.0f}%: {pct(report['confident_share'])} "
                     f"of images, {pct(report['accuracy_confident'])} right"
                     + (f"; calibration error (ECE) {report['ece']:.3f}" if report.get("ece") is not None else ""))
    lines += _operating_lines(report)
    if report.get("agreement"):
        lines.append("agreement: " + ", ".join(f"{k} {pct(v)}" for k, v in report["agreement"].items()))
    for u in report["unreadable"]:
        lines.append(f"unreadable: {u['file']}: {u['reason']}")
    return "\n".join(lines)


def _ci(v, ci) -> str:
    return f"{pct(v)} ({pct(ci[0])}-{pct(ci[1])})" if ci and ci[0] is not None else pct(v)


def _operating_lines(report: dict) -> list[str]:
    op = report.get("operating")
    if not op:
        ovr = [f"{name} {c['auc']:.3f} ({c['auc_ci'][0]:.3f}-{c['auc_ci'][1]:.3f})"
               for name, c in report.get("one_vs_rest", {}).items() if c["auc"] is not None]
        return (["AUC of each class against the rest (95% bootstrap intervals): " + ", ".join(ovr)] if ovr else []) + (
            [f"answers: {report['decided_by']}"] if "decided_by" in report else [])
    names = report["labels"]
    finding = names[op["finding"]]
    auc = "-" if op["auc"] is None else f"{op['auc']:.3f} (95% CI {op['auc_ci'][0]:.3f}-{op['auc_ci'][1]:.3f})"
    lines = [f"ROC of {finding} on {op['n']} images ({op['positives']} {finding}, {op['negatives']} other; "
             f"95% bootstrap intervals, {op['bootstrap']} resamples): AUC {auc}",
             f"  P({finding}) >=  sensitivity (95% CI)     specificity (95% CI)     PPV      NPV"]
    for r in op["table"]:
        if round(r["threshold"] * 10, 6) % 1 == 0:  # every 0.1 in the text; every 0.05 in the JSON
            lines.append(f"  {r['threshold']:.2f}        {_ci(r['sensitivity'], r['sensitivity_ci']):24s} "
                         f"{_ci(r['specificity'], r['specificity_ci']):24s} {pct(r['ppv']):8s} {pct(r['npv'])}")
    lines.append(f"answers: {report['decided_by']}")
    at = report.get("at_point")
    if at:
        lines.append(f"at the operating point: sensitivity {_ci(at.get('sensitivity'), at.get('sensitivity_ci'))}, "
                     f"specificity {_ci(at.get('specificity'), at.get('specificity_ci'))}, "
                     f"PPV {pct(at.get('ppv'))}, NPV {pct(at.get('npv'))} over {at['answered']} answered; "
                     f"{at['referred']} referred")
    return lines
