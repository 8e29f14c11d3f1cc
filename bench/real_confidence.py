"""Honest confidence at every framing: a model's answers on a labelled folder of real images in each
framing an upload comes in (:data:`engine.learn.augment.UPLOAD_FRAMINGS`: as given, centre crops
of the width, stretched to a full-resolution X-ray's natural aspect ratio, squeezed), through the
upload path, in quantized clear mode (what the circuit computes; encrypted = quantized on >= 99.5%).

For each framing it prints accuracy, per-class recall, the share flagged by the input check, the
calibration error (ECE), the share answered at >= 90% calibrated confidence and how often those
answers are right. It also prints how often the answer stays the same under the centre crops.

    python bench/real_confidence.py --dataset pneumoniamnist --images ../shared/data/real/chest_xray_train \\
        --held-out --label-map NORMAL=0,PNEUMONIA=1 --json bench/results/real/confidence_holdout.json

``--held-out`` keeps the part of the folder that the model held out when it trained on it (same
share, same seed), which is what choosing may look at. ``chest_xray_224`` and ``busi`` are for
reporting only.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from engine.learn.augment import UPLOAD_FRAMINGS
from engine.learn.labelled import LabelledFile, parse_label_map, read_labelled, stratified_holdout

CONFIDENT = 0.9  # engine.learn.guard.CONFIDENT: answers at this calibrated confidence are counted apart
CROPS = ("as given", "centre 85%", "centre 75%")  # the framing agreement: same answer under these


def framed(files: list[LabelledFile], share: float, stretch: float) -> list[LabelledFile]:
    """``files`` reframed as :func:`engine.learn.augment.reframe` does (``bench/real_train.variant``);
    as given, they are the files themselves."""
    from bench.real_train import variant

    return files if share == 1 and stretch == 1 else variant(files, share, stretch)


def held_out(files: list[LabelledFile], saved) -> list[LabelledFile]:
    """The files ``saved`` held out when it trained on this folder (its holdout share and seed, over
    the readable files in the order they are read, as training drew them)."""
    readable = [f for f in files if f.error is None]
    mask = stratified_holdout(np.asarray([f.label for f in readable]), saved.config.data.holdout,
                              saved.config.train.seed)
    return [f for f, m in zip(readable, mask) if m]


def measure(saved, files: list[LabelledFile], mode: str = "quantized") -> dict:
    from engine.learn import guard as guards
    from engine.study.infer import Predictor
    from engine.study.validate import validate

    predictor = Predictor(saved)
    guard = guards.for_model(saved)
    rows, answers = {}, {}
    for kind, (share, stretch) in UPLOAD_FRAMINGS.items():
        r = validate(predictor, guard, framed(files, share, stretch), mode)
        m = r["modes"][mode]
        rows[kind] = {"n": r["n"], "accuracy": m["accuracy"], "auc": m["auc"], "recall": m["recall"],
                      "flagged": r["flagged_share"], "ece": r["ece"], "confident_share": r["confident_share"],
                      "confident_right": r["accuracy_confident"],
                      "confident_n": int(sum(1 for im in r["images"] if (im["confidence"] or 0) >= CONFIDENT))}
        answers[kind] = {im["file"]: im["prediction"] for im in r["images"]}
    same = [all(answers[k].get(name) == p for k in CROPS) for name, p in answers[CROPS[0]].items()]
    return {"framings": rows, "crop_agreement": float(np.mean(same)) if same else None}


def pct(v) -> str:
    return "-" if v is None else f"{100 * v:.1f}"


def markdown(result: dict) -> str:
    rows = result["framings"]
    names = list(next(iter(rows.values()))["recall"])
    lines = [f"| framing | n | accuracy | {' | '.join(f'recall {n}' for n in names)} | flagged | ECE | "
             ">= 90%: share (n), right |", "|---" * (6 + len(names)) + "|"]
    for kind, r in rows.items():
        ece = "-" if r["ece"] is None else f"{r['ece']:.3f}"
        lines.append(f"| {kind} | {r['n']} | {pct(r['accuracy'])} | "
                     + " | ".join(pct(r["recall"][n]) for n in names)
                     + f" | {pct(r['flagged'])} | {ece} | {pct(r['confident_share'])} ({r['confident_n']}), "
                       f"{pct(r['confident_right'])} |")
    lines.append(f"\nsame answer under centre crops of 100/85/75% of the width: {pct(result['crop_agreement'])}%")
    return "\n".join(lines)


def main() -> int:
    from bench.real_train import labelled_args

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    labelled_args(ap)
    ap.add_argument("--models-dir", default=None)
    ap.add_argument("--held-out", action="store_true", help="only the part the model held out of this folder")
    ap.add_argument("--mode", default="quantized", choices=["float", "quantized", "simulate", "fhe"])
    a = ap.parse_args()
    from engine.learn import registry
    from engine.learn.data import dataset_info

    saved = registry.load(a.dataset, a.model, Path(a.models_dir) if a.models_dir else None)
    files = read_labelled(Path(a.images), dataset_info(a.dataset), parse_label_map(a.label_map), a.images,
                          limit=50_000)
    if a.held_out:
        files = held_out(files, saved)
    t0 = time.perf_counter()
    result = {"dataset": a.dataset, "model": saved.name, "model_hash": saved.hash, "images": a.images,
              "held_out": a.held_out, "mode": a.mode, **measure(saved, files, a.mode)}
    result["seconds"] = time.perf_counter() - t0
    result["date"] = time.strftime("%Y-%m-%d")
    print(f"{saved.dataset}/{saved.name} on {a.images}{' (held-out part)' if a.held_out else ''}, {a.mode}")
    print(markdown(result))
    if a.json:
        Path(a.json).parent.mkdir(parents=True, exist_ok=True)
        Path(a.json).write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
