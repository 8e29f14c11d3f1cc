"""Choose a model trained with labelled real images: train candidates with ``engine.learn.train``
(MedMNIST + a labelled folder through the upload path) and score each, in the clear (the QAT
model's own forward, which the circuit computes), on what choosing may look at:

- MedMNIST's validation split, and the labelled folder's held-out part;
- a folder of real images (``--check``, e.g. ``../shared/data/real/chest_xray_224``) as uploaded,
  at centre crops of 100/85/75% of the width (the answer should not change), and stretched
  sideways by 1.2 (the natural aspect ratio of a full-resolution X-ray, which the 224 px copies lost).

Never the MedMNIST test split: it is printed for the record only.

    python bench/real_train.py --images ../shared/data/real/chest_xray_train \\
        --check ../shared/data/real/chest_xray_224 --label-map NORMAL=0,PNEUMONIA=1 \\
        --candidates 'hidden=16;pool=3;w=2;a=2' 'hidden=16;pool=2;prune=8' --json bench/results/real/train_candidates.json
"""

from __future__ import annotations

import argparse
import io
import json
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from engine.config import DataConfig, PipelineConfig
from engine.learn import metrics
from engine.learn.data import dataset_info, load_split, to_features
from engine.learn.labelled import LabelledFile, parse_label_map, prepare_training_images, read_labelled
from engine.learn.recipes import recipe
from engine.learn.train import train

REPO = Path(__file__).resolve().parent.parent

SHARES = (1.0, 0.85, 0.75)
KEYS = {"hidden": ("model", "hidden", lambda v: tuple(int(h) for h in v.split("/"))),
        "pool": ("model", "input_pool", float), "w": ("model", "weight_bits", int), "a": ("model", "act_bits", int),
        "i": ("model", "input_bits", int), "prune": ("model", "max_active_inputs", int),
        "epochs": ("train", "epochs", int), "lr": ("train", "lr", float), "copies": ("train", "image_copies", int),
        "upload": ("train", "augment_upload", float), "stretch": ("train", "augment_stretch", float),
        "seed": ("train", "seed", int), "wd": ("train", "weight_decay", float), "noise": ("train", "rounding_noise", float),
        "pruneat": ("train", "prune_after", float),
        "only": ("data", "images_only", lambda v: v == "1"), "medmnist": ("data", "images", None)}


def labelled_args(ap) -> None:
    """What every bench on one's own labelled images asks: the model, the folder, where to write."""
    ap.add_argument("--dataset", default="pneumoniamnist")
    ap.add_argument("--model", default=None, help="model name (default: the dataset's default)")
    ap.add_argument("--images", required=True, help="a labelled folder (one subfolder per class)")
    ap.add_argument("--label-map", default=None, help="e.g. NORMAL=0,PNEUMONIA=1 (default: the dataset's label names)")
    ap.add_argument("--json", default=None, help="also write the figures here")


def variant(files: list[LabelledFile], share: float = 1.0, stretch: float = 1.0) -> list[LabelledFile]:
    """``files`` reframed as :func:`engine.learn.augment.reframe` does (PNG, lossless)."""
    from engine.learn.augment import reframe

    out = []
    for f in files:
        b = io.BytesIO()
        Image.fromarray(reframe(np.asarray(Image.open(io.BytesIO(f.data))), share, stretch)).save(b, "PNG")
        out.append(LabelledFile(f.name, f.label, b.getvalue()))
    return out


def configure(base: PipelineConfig, text: str) -> PipelineConfig:
    parts = {"model": {}, "train": {}, "data": {}}
    for item in filter(None, text.split(";")):
        k, _, v = item.partition("=")
        where, field, conv = KEYS[k]
        if conv is None:  # medmnist=0: the folder alone
            parts["data"]["images_only"] = v == "0"
            continue
        parts[where][field] = conv(v)
    return base.replace(model=replace(base.model, **parts["model"]), train=replace(base.train, **parts["train"]),
                        data=replace(base.data, **parts["data"]))


def report(labels: np.ndarray, logits: np.ndarray, info) -> dict:
    pred = metrics.scores_from_logits(logits, info).argmax(axis=1)
    rec = [float((pred[labels == c] == c).mean()) for c in sorted(info.labels)]
    return {"accuracy": float((pred == labels).mean()), "balanced": float(np.mean(rec)), "recall": rec, "pred": pred}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dataset", default="pneumoniamnist")
    ap.add_argument("--images", required=True)
    ap.add_argument("--check", required=True)
    ap.add_argument("--label-map", default="")
    ap.add_argument("--candidates", nargs="+", default=[""])
    ap.add_argument("--json", default=None)
    a = ap.parse_args()

    info = dataset_info(a.dataset)
    base_cfg, _src = recipe(a.dataset)
    base = PipelineConfig(data=DataConfig(a.dataset, images=a.images, label_map=a.label_map), **{
        k: base_cfg[k] for k in ("model", "train", "compile")})
    checks = read_labelled(Path(a.check), info, parse_label_map(a.label_map))
    check_sets = {f"crop{int(s * 100)}": variant(checks, s) for s in SHARES}
    check_sets["stretch1.2"] = variant(checks, 1.0, 1.2)
    prepared = {k: prepare_training_images(v, info, 28, info.n_channels, k, 0.0, 0) for k, v in check_sets.items()}
    y_check = prepared["crop100"].labels
    val, test = load_split(base.data, "val"), load_split(base.data, "test")
    rows = []
    for text in a.candidates:
        cfg = configure(base, text)
        t0 = time.perf_counter()
        res = train(cfg)
        model, pool = res.model, cfg.model.input_pool

        def logits(images):
            with torch.no_grad():
                return model(torch.from_numpy(to_features(images, pool))).numpy()

        r = {k: report(v.labels, logits(v.clean), info) for k, v in prepared.items()}
        agree = float(np.mean([(r["crop100"]["pred"] == r[f"crop{int(s * 100)}"]["pred"]) for s in SHARES[1:]], axis=0).__eq__(1).mean())
        rv, rt = report(val.labels[:, 0], logits(val.images), info), report(test.labels[:, 0], logits(test.images), info)
        row = {"candidate": text or "recipe", "seconds": round(time.perf_counter() - t0, 1), "best_epoch": res.best_epoch,
               "val": rv["accuracy"], "val_balanced": rv["balanced"], "holdout": res.metrics.get("holdout", {}).get("accuracy"),
               "real": r["crop100"]["accuracy"], "real_recall": r["crop100"]["recall"],
               "crop_agreement": agree, "stretch": r["stretch1.2"]["accuracy"], "test_record_only": rt["accuracy"]}
        rows.append(row)
        print(f"{row['candidate']:<40} val {100 * rv['accuracy']:.1f} (bal {100 * rv['balanced']:.1f}) "
              f"holdout {100 * (row['holdout'] or 0):.1f} | real {100 * row['real']:.1f} "
              f"spec {100 * row['real_recall'][0]:.1f} rec {100 * row['real_recall'][1]:.1f} crops {100 * agree:.1f} "
              f"stretch {100 * row['stretch']:.1f} | test {100 * rt['accuracy']:.1f} ({row['seconds']} s, ep {res.best_epoch})",
              flush=True)
    if a.json:
        Path(a.json).parent.mkdir(parents=True, exist_ok=True)
        Path(a.json).write_text(json.dumps({"dataset": a.dataset, "images": a.images, "check": a.check,
                                            "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
