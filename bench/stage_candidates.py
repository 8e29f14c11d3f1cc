"""Feature-stage candidates for PneumoniaMNIST trained with real X-rays, scored on what choosing may
look at: MedMNIST's validation split and the held-out part of the labelled folder, in each upload
framing (:data:`engine.learn.augment.UPLOAD_FRAMINGS`). Clear QAT forward (what the circuit
computes); the MedMNIST test split is printed for the record only.

    python bench/stage_candidates.py --images ../shared/data/real/chest_xray_train --models-dir /tmp/candidates \\
        --candidates 'scatter2-k16=grid=2;k=16' 'scatter3-k24=grid=3;k=24' --json bench/results/real/stage_candidates.json
    python bench/stage_candidates.py --images ../shared/data/real/chest_xray_train --models-dir /tmp/candidates --score-only

Each candidate is the scattering recipe (16 neurons, 2-bit weights and activations, 3-bit inputs,
gradual pruning over 10 epochs, 40 epochs, 8 real-upload versions per image) with the changes its
spec names: ``grid`` (feature grid), ``k`` (inputs per neuron), ``i`` (input bits), ``w`` (weight
bits), ``l`` (orientations), ``framed`` (held-out framings compete), ``balanced`` (the decision
balanced on validation). ``--score-only`` scores the candidates already saved in ``--models-dir``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

import numpy as np

KEYS = {"grid": ("model", "feature_grid", int), "k": ("model", "max_active_inputs", int),
        "i": ("model", "input_bits", int), "w": ("model", "weight_bits", int), "l": ("model", "scattering_l", int),
        "framed": ("train", "select_framed", lambda v: v == "1"), "balanced": ("train", "balance_decision", lambda v: v == "1")}


def config(spec: str, images: str, label_map: str):
    from engine.config import CompileConfig, DataConfig, ModelConfig, PipelineConfig, TrainConfig

    model = {"hidden": (16,), "weight_bits": 2, "act_bits": 2, "input_bits": 3, "max_active_inputs": 16,
             "features": "scattering", "feature_grid": 2}
    train = {"epochs": 40, "lr": 1e-3, "augment_shift": 2, "augment_rotate": 10.0, "augment_scale": 0.1,
             "prune_epochs": 10, "image_copies": 8}
    parts = {"model": model, "train": train}
    for item in filter(None, spec.split(";")):
        k, _, v = item.partition("=")
        where, name, conv = KEYS[k]
        parts[where][name] = conv(v)
    return PipelineConfig(data=DataConfig(images=images, label_map=label_map), model=ModelConfig(**model),
                          train=TrainConfig(**train), compile=CompileConfig(rounding_threshold_bits=6, p_error=0.01))


def score(saved, images_dir: str, label_map: str) -> dict:
    """Balanced-decision-free figures of a saved candidate on MedMNIST validation (and test, for the
    record) and on the held-out images in each framing."""
    import torch

    from engine.learn.data import dataset_info, load_split
    from engine.learn.labelled import training_images

    info = dataset_info(saved.dataset)
    data = dataclasses.replace(saved.config.data, images=images_dir, label_map=label_map)
    images = training_images(data, info, saved.config.train.image_copies, saved.config.train.seed)
    model = saved.load_torch()

    def figures(x: np.ndarray, y: np.ndarray) -> dict:
        with torch.no_grad():
            pred = model(torch.from_numpy(saved.features(x))).numpy().argmax(axis=1)
        y = np.asarray(y).reshape(-1)
        return {"accuracy": float((pred == y).mean()), "recall_pneumonia": float(pred[y == 1].mean()),
                "specificity": float(1 - pred[y == 0].mean())}

    val, test = load_split(data, "val"), load_split(data, "test")
    out = {"val": figures(val.images, val.labels), "test_record_only": figures(test.images, test.labels),
           "held_out": {kind: figures(x, y) for kind, (x, y) in images.framed(info, 28, 1).items()}}
    held = [r["accuracy"] for r in out["held_out"].values()]
    out["held_out_mean"] = float(np.mean(held))
    out["inputs"] = saved.in_features
    out["accumulator_bits"] = saved.metrics.get("accumulator_bits")
    out["decision_offset"] = saved.metrics.get("decision_offset")
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--images", required=True)
    ap.add_argument("--label-map", default="NORMAL=0,PNEUMONIA=1")
    ap.add_argument("--models-dir", required=True, help="where the candidates are saved (outside the registry)")
    ap.add_argument("--candidates", nargs="*", default=[], help="NAME=SPEC, e.g. 'scatter3-k24=grid=3;k=24'")
    ap.add_argument("--score-only", action="store_true", help="score the candidates saved in --models-dir")
    ap.add_argument("--json", default=None)
    a = ap.parse_args()

    from engine.learn import pipeline, registry

    if not a.score_only:
        for item in a.candidates:
            name, _, spec = item.partition("=")
            t0 = time.perf_counter()
            pipeline.run(config(spec, str(Path(a.images).resolve()), a.label_map), name, Path(a.models_dir),
                         overwrite=True, hooks=pipeline.Hooks(say=print))
            print(f"{name}: trained in {time.perf_counter() - t0:.0f} s")
    rows = []
    for saved in sorted(registry.list_models("pneumoniamnist", Path(a.models_dir)), key=lambda s: s.name):
        m, t = saved.config.model, saved.config.train
        row = {"name": saved.name, "feature_grid": m.feature_grid, "scattering_l": m.scattering_l,
               "max_active_inputs": m.max_active_inputs, "input_bits": m.input_bits, "weight_bits": m.weight_bits,
               "select_framed": t.select_framed, "balance_decision": t.balance_decision,
               **score(saved, a.images, a.label_map)}
        rows.append(row)
        print(f"{row['name']:10s} grid {row['feature_grid']} L {row['scattering_l']} k {row['max_active_inputs']:2d} "
              f"i{row['input_bits']} w{row['weight_bits']} framed {int(row['select_framed'])} balanced "
              f"{int(row['balance_decision'])}: {row['inputs']} inputs, {row['accumulator_bits']}-bit accumulators; "
              f"val {100 * row['val']['accuracy']:.1f}%, held-out mean over framings {100 * row['held_out_mean']:.1f}% "
              f"(natural aspect 1.3x {100 * row['held_out']['natural aspect 1.3x']['accuracy']:.1f}%); "
              f"test (record only) {100 * row['test_record_only']['accuracy']:.1f}%", flush=True)
    if a.json:
        from engine.study.evaluate import machine_info

        Path(a.json).write_text(json.dumps({"date": time.strftime("%Y-%m-%d"), "machine": machine_info(),
                                            "images": a.images, "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
