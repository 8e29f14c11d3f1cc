"""The shipped model on real labelled images through the upload path (``evaluate --images``'s
own code), with and without each client-side correction (the squeeze estimator, the softening),
in quantized clear mode (the circuit's integers; encryption agrees on >= 99.5%).

Per setting: accuracy, recall per class, the share of images flagged by the input check, the
answers at >= 90% calibrated confidence and how often they are right, the framing agreement
(centre crops of 100/85/75% of the width give the same answer) and the accuracy on the same
images stretched sideways by 1.2 (the natural aspect ratio of a full-resolution chest X-ray,
which the 224 px copies lost).

    python bench/real_images.py --dataset pneumoniamnist --images ../shared/data/real/chest_xray_224 \\
        --json bench/results/real/chest_xray_224_corrections.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

from bench.real_train import SHARES, labelled_args, variant
from engine.learn import guard as guards
from engine.learn import registry
from engine.learn.framing import Framing
from engine.study.infer import Predictor
from engine.study.validate import parse_label_map, read_labelled, validate

REPO = Path(__file__).resolve().parent.parent


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    labelled_args(ap)
    ap.add_argument("--no-crops", action="store_true", help="skip the crops and the stretch (BUSI: not X-ray framing)")
    a = ap.parse_args()

    p = Predictor.open(a.dataset, a.model)
    g = guards.for_model(p.saved)
    files = read_labelled(Path(a.images), p.info, parse_label_map(a.label_map))
    sets = {"as given": files}
    if not a.no_crops:
        sets.update({f"crop {int(100 * s)}%": variant(files, s) for s in SHARES[1:]})
        sets["stretched 1.2"] = variant(files, 1.0, 1.2)
    # the squeeze estimator: the model's own, else the one another model of the dataset carries (to measure it)
    stored_framing = g.framing or next(filter(None, (Framing.load(m.path) for m in registry.list_models(a.dataset))), None)
    settings = {"no correction": (None, False), "softening only": (None, True)}
    if stored_framing is not None:
        settings["squeeze estimator only"] = (stored_framing, False)
        settings["both"] = (stored_framing, True)
    rows = []
    for label, (framing, soften) in settings.items():
        g.framing, g.soften = framing, soften
        reports = {k: validate(p, g, v, "quantized") for k, v in sets.items()}
        r = reports["as given"]
        m = r["modes"]["quantized"]
        row = {"setting": label, "n": m["n"], "accuracy": m["accuracy"], "balanced": m["balanced_accuracy"],
               "recall": m["recall"], "flagged_share": r["flagged_share"], "confident_share": r["confident_share"],
               "accuracy_confident": r["accuracy_confident"]}
        if not a.no_crops:
            answers = np.array([[im["prediction"] for im in reports[k]["images"]]
                                for k in ["as given"] + [f"crop {int(100 * s)}%" for s in SHARES[1:]]])
            row["framing_agreement"] = float((answers == answers[0]).all(axis=0).mean())
            row["stretched_accuracy"] = reports["stretched 1.2"]["modes"]["quantized"]["accuracy"]
            row["stretched_recall"] = reports["stretched 1.2"]["modes"]["quantized"]["recall"]
            row["stretched_accuracy_confident"] = reports["stretched 1.2"]["accuracy_confident"]
        rows.append(row)
        rec = ", ".join(f"{k} {100 * v:.1f}%" for k, v in m["recall"].items())
        conf = "-" if row["accuracy_confident"] is None else f"{100 * row['accuracy_confident']:.1f}%"
        extra = ("" if a.no_crops else f"; crops agree {100 * row['framing_agreement']:.1f}%; "
                 f"stretched 1.2: {100 * row['stretched_accuracy']:.1f}%")
        print(f"{label:<24} accuracy {100 * m['accuracy']:.1f}% ({rec}); flagged {100 * r['flagged_share']:.1f}%; "
              f">= 90%: {100 * r['confident_share']:.1f}% of answers, right {conf}{extra}", flush=True)
    if a.json:
        Path(a.json).parent.mkdir(parents=True, exist_ok=True)
        Path(a.json).write_text(json.dumps({"dataset": a.dataset, "model": p.saved.name, "images": a.images,
                                            "date": time.strftime("%Y-%m-%d"), "mode": "quantized",
                                            "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
