"""Framing on real uploads: the upload path with and without the model's squeeze estimator, on a
labelled folder of real images, in quantized clear mode (equal to encryption on >= 99.5%).

For each setting it prints accuracy and per-class recall, the share answered at >= 90% calibrated
confidence and how often those are right, the framing agreement (centre crops of 100%, 85% and
75% of the width, full height, give the same answer), and the accuracy on MedMNIST images
uploaded as PNG files (``--splits``; their framing must stay as it is).

    python bench/real_framing.py --dataset pneumoniamnist --images ../shared/data/real/chest_xray_224 \\
        --label-map NORMAL=0,PNEUMONIA=1 --settings 1.0:0.9,1.05:0.9,1.1:0.9 --json bench/results/real/framing.json

``--settings SCALE:THRESHOLD,...`` (the crop keeps s x SCALE of the width when that is below
THRESHOLD) tries settings besides "off" and the model's stored one. Choose on this folder and on
validation, never on the MedMNIST test split.
"""

from __future__ import annotations

import argparse
import io
import json
import sys
from pathlib import Path

import numpy as np
from PIL import Image

from engine.learn import guard as guards
from engine.learn.data import DataConfig, load_split
from engine.learn.framing import Framing
from engine.study.infer import Predictor
from bench.real_train import SHARES, labelled_args, variant  # centre crops of the width, as there
from engine.study.validate import LabelledFile, parse_label_map, read_labelled, validate

REPO = Path(__file__).resolve().parent.parent

def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    labelled_args(ap)
    ap.add_argument("--settings", default="", help="SCALE:THRESHOLD pairs to try besides off and the stored one")
    ap.add_argument("--splits", default="val",
                    help="MedMNIST splits uploaded as PNG files, e.g. val,test (test: for reporting only, never for choosing)")
    a = ap.parse_args()

    p = Predictor.open(a.dataset, a.model)
    g = guards.for_model(p.saved)
    stored = Framing.load(p.saved.path)
    if g is None or stored is None:
        sys.exit(f"{a.dataset}/{p.saved.name} needs its guard.npz and framing.npz")
    files = read_labelled(Path(a.images), p.info, parse_label_map(a.label_map))
    crops = {s: variant(files, s) if s < 1 else files for s in SHARES}
    uploads = {}  # MedMNIST splits uploaded as PNG files: their framing must stay as it is
    for split in a.splits.split(","):
        data = load_split(DataConfig(a.dataset, allow_download=False), split)
        uploads[split] = []
        for i, (x, y) in enumerate(zip(data.images, data.labels.reshape(-1))):
            b = io.BytesIO()
            Image.fromarray(x).save(b, "PNG")
            uploads[split].append(LabelledFile(f"{split}/{i}.png", int(y), b.getvalue()))

    settings = [("off", None), (f"stored {stored.scale:g}:{stored.threshold:g}", (stored.scale, stored.threshold))]
    settings += [(s, tuple(float(v) for v in s.split(":"))) for s in a.settings.split(",") if s]
    rows = []
    for label, st in settings:
        if st is None:
            g.framing = None
        else:
            g.framing = Framing(stored.nets, *st)
        preds, report = {}, None
        for share, cf in crops.items():
            r = validate(p, g, cf, "quantized")
            preds[share] = [im["prediction"] for im in r["images"]]
            report = report or r
        answers = np.array(list(preds.values()))
        m = report["modes"]["quantized"]
        as_uploads = {split: validate(p, g, files_, "quantized")["modes"]["quantized"]["accuracy"]
                      for split, files_ in uploads.items()}
        row = {"setting": label, "n": m["n"], "accuracy": m["accuracy"], "recall": m["recall"],
               "confident_share": report["confident_share"], "accuracy_confident": report["accuracy_confident"],
               "framing_agreement": float((answers == answers[0]).all(axis=0).mean()),
               "accuracy_as_uploads": as_uploads}
        rows.append(row)
        rec = ", ".join(f"{k} {100 * v:.1f}%" for k, v in m["recall"].items())
        conf = "-" if row["accuracy_confident"] is None else f"{100 * row['accuracy_confident']:.1f}%"
        print(f"{label:<16} accuracy {100 * m['accuracy']:.1f}% ({rec}); >= 90%: {100 * row['confident_share']:.1f}% "
              f"of answers, right {conf}; framing agreement {100 * row['framing_agreement']:.1f}%; "
              + "; ".join(f"{k} split as uploads {100 * v:.1f}%" for k, v in as_uploads.items()), flush=True)
    if a.json:
        Path(a.json).parent.mkdir(parents=True, exist_ok=True)
        Path(a.json).write_text(json.dumps({"dataset": a.dataset, "model": p.saved.name, "images": a.images,
                                            "shares": SHARES, "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
