"""Validation on one's own labelled images: a folder (or ``.zip``) with one subfolder per class,
put through exactly the upload path (decode, crop and resize, the input check, the calibrated
confidence, encryption in ``fhe`` mode), with the figures a hospital checks a model by.

Folder names match the dataset's label names case-insensitively (or any comma-separated part
of one: BreastMNIST's ``normal, benign`` takes ``normal`` and ``benign``), or label indices;
a label map (``NORMAL=0,PNEUMONIA=1``) names others.
"""

from __future__ import annotations

import io
import zipfile
from dataclasses import dataclass
from itertools import combinations
from pathlib import Path, PurePosixPath

import numpy as np

from ..learn import metrics
from ..learn.data import DatasetInfo
from ..learn.guard import CONFIDENT, Guard, Screened, screen  # CONFIDENT: answers at this confidence are counted apart
from ..learn.images import EXTENSIONS, MAX_ARCHIVE_FILES, MAX_BYTES, ImageError
from .evaluate import agreement
RELIABILITY_BINS = (0.5, 0.6, 0.7, 0.8, 0.9, 1.0)
IGNORED = ("__MACOSX", ".DS_Store", "Thumbs.db")


class LabelError(ValueError):
    """The folder's layout does not say each image's label; the message names what to change."""


def parse_label_map(text: str | None) -> dict[str, int]:
    """``"NORMAL=0,PNEUMONIA=1"`` -> ``{"normal": 0, "pneumonia": 1}`` (names case-insensitive)."""
    out: dict[str, int] = {}
    for part in (text or "").split(","):
        if not part.strip():
            continue
        name, sep, index = part.partition("=")
        try:
            if not sep or not name.strip():
                raise ValueError
            out[name.strip().lower()] = int(index)
        except ValueError:
            raise LabelError(f"--label-map takes NAME=INDEX pairs separated by commas, got '{part.strip()}'.") from None
    return out


def label_of(folder: str, info: DatasetInfo, label_map: dict[str, int]) -> int | None:
    """The label index a class folder's name stands for, or None."""
    key = folder.strip().lower()
    if key in label_map:
        return label_map[key]
    for index, name in info.labels.items():
        if key == name.lower() or key in (p.strip().lower() for p in name.split(",")):
            return index
    if key.isdigit() and int(key) in info.labels:
        return int(key)
    return None


@dataclass
class LabelledFile:
    name: str  # the path inside the folder or archive, class folder first
    label: int
    data: bytes | None
    error: str | None = None  # set when the file could not be read at all


def _members(source: Path | bytes, name: str) -> list[tuple[str, int, object]]:
    """(relative posix path, size, reader) of every file in a folder or zip archive."""
    if isinstance(source, Path) and source.is_dir():
        return [(p.relative_to(source).as_posix(), p.stat().st_size, p.read_bytes)
                for p in sorted(source.rglob("*")) if p.is_file()]
    data = source.read_bytes() if isinstance(source, Path) else source
    try:
        archive = zipfile.ZipFile(io.BytesIO(data))
    except zipfile.BadZipFile:
        raise LabelError(f"{name} is neither a folder nor a readable zip archive.") from None
    return [(m.filename, m.file_size, (lambda m=m: archive.read(m))) for m in archive.infolist() if not m.is_dir()]


def read_labelled(source: Path | bytes, info: DatasetInfo, label_map: dict[str, int] | None = None,
                  name: str | None = None) -> list[LabelledFile]:
    """Every image file under ``source`` (a folder, a zip's path or its bytes) with the label of
    its class folder. A single top folder holding the class folders (a zipped folder) is looked
    through. Files that are not images by extension are skipped; a class folder that matches no
    label is a :class:`LabelError` naming it."""
    if info.multi_label:
        raise LabelError(f"{info.flag} is multi-label: one folder per class cannot say an image's labels.")
    label_map = label_map or {}
    name = name or (str(source) if isinstance(source, Path) else "the archive")
    if isinstance(source, Path) and not source.exists():
        raise LabelError(f"{source} does not exist.")
    files = [(PurePosixPath(p).parts, size, read) for p, size, read in _members(source, name)
             if not any(part in IGNORED or part.startswith("._") for part in PurePosixPath(p).parts)]
    images = [f for f in files if f[0][-1].rsplit(".", 1)[-1].lower() in (*EXTENSIONS, "dcm", "dicom")]
    if len(images) > MAX_ARCHIVE_FILES * 10:
        raise LabelError(f"{name} holds {len(images)} images; the limit is {MAX_ARCHIVE_FILES * 10}. Split it.")
    # a zipped folder: one top folder around the class folders
    while images and all(len(parts) > 2 for parts, _s, _r in images) and len({p[0] for p, _s, _r in images}) == 1:
        images = [(parts[1:], size, read) for parts, size, read in images]
    loose = [("/".join(p), s, r) for p, s, r in images if len(p) < 2]
    if loose and len(loose) == len(images):
        raise LabelError(f"{name} has no class folders: put each image in a folder named after its label "
                         f"({', '.join(info.labels.values())}) or its index.")
    classes = sorted({parts[0] for parts, _s, _r in images if len(parts) >= 2})
    unknown = [c for c in classes if label_of(c, info, label_map) is None]
    if unknown:
        names = "; ".join(f"{i} = {n}" for i, n in info.labels.items())
        raise LabelError(f"Folder '{unknown[0]}' in {name} matches no {info.flag} label ({names}). Rename it, or map it "
                         f"with --label-map, e.g. {unknown[0]}={min(info.labels)}.")
    out = []
    for parts, size, read in images:
        path = "/".join(parts)
        if len(parts) < 2:
            out.append(LabelledFile(path, -1, None, "not in a class folder"))
        elif size > MAX_BYTES:
            out.append(LabelledFile(path, label_of(parts[0], info, label_map), None,
                                    f"{size / 1e6:.0f} MB; the limit is {MAX_BYTES // 2**20} MB"))
        else:
            out.append(LabelledFile(path, label_of(parts[0], info, label_map), read()))
    if not out:
        raise LabelError(f"{name} holds no image ({', '.join(EXTENSIONS)}, dcm).")
    return out


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


def validate(predictor, guard: Guard | None, files: list[LabelledFile], modes, progress=None,
             source: str = "") -> dict:
    """The report on ``files`` (see the module docstring): per mode, and per image for the last
    mode given (the answer the user would get)."""
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
    conf = np.asarray([guard.confidence(z).top if guard is not None else float(np.max(s))
                       for z, s in zip(last.logits, last.scores)])
    uncertain = [guard.confidence(z).uncertain if guard is not None else None for z in last.logits]
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
        "images": [{"file": it.name, "label": int(y), "label_name": info.labels[int(y)], "prediction": int(p),
                    "prediction_name": info.labels[int(p)], "right": bool(p == y), "confidence": round(float(c), 4),
                    "uncertain": u, "flagged": bool(f),
                    "warning": it.verdict.message if it.verdict is not None and it.verdict.foreign else ""}
                   for it, y, p, c, u, f in zip(good, labels, pred, conf, uncertain, flagged)],
    })
    if "fhe" in results:
        report["latency_median_s"] = float(np.median(results["fhe"].latency_s))
    return report


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
                     f"of images, {pct(report['accuracy_confident'])} right")
    if report.get("agreement"):
        lines.append("agreement: " + ", ".join(f"{k} {pct(v)}" for k, v in report["agreement"].items()))
    for u in report["unreadable"]:
        lines.append(f"unreadable: {u['file']}: {u['reason']}")
    return "\n".join(lines)
