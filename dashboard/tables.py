"""Answers as the pages show them: result tables, confidence, agreement and sizes."""

from __future__ import annotations

import pandas as pd

from engine.learn import registry
from engine.learn.metrics import label_text

from . import points
from .circuits import guard

MODE_LABELS = {"float": "Float (PyTorch)", "quantized": "Quantized clear", "simulate": "FHE simulation", "fhe": "Encrypted (FHE)"}


def decision_text(saved: registry.SavedModel, logits, info, verdict=None) -> str:
    """Which rule decided an answer, and what it decided: shown under every answer."""
    decided = points.decision(saved, logits, info, guard(saved), verdict)
    if not decided:
        return f"Decided by {points.in_force(saved)}."
    return f"Decided at the {points.in_force(saved)}: **{decided}**."


def batch_table(items, fhe, info, guard_, saved: registry.SavedModel) -> pd.DataFrame:
    """One row per uploaded file; with an operating point in force, the decision at that point too."""
    from engine.learn.screening import batch_rows

    table = pd.DataFrame(batch_rows(items, fhe.logits, fhe.predictions, lambda p: label_text(info, p), guard_))
    if points.current(saved) is not None:
        decided = iter(points.decisions(saved, items, fhe.logits, info, guard_))
        table.insert(2, "decision (operating point)", [None if it.error else next(decided) for it in items])
    return table


def confidence_text(saved: registry.SavedModel, logits, verdict=None) -> str:
    """The calibrated confidence of one answer, as shown next to it ('' without a guard); withheld
    for an image the input check flagged (``verdict``)."""
    g = guard(saved)
    if g is None:
        return ""
    return g.confidence(logits, verdict).text()


def results_table(results: dict, info, labels_true=None, guard=None) -> pd.DataFrame:
    """One row per image and mode: prediction, probabilities (calibrated with the model's guard
    where given), latency and FHE stage timings."""
    rows = []
    for mode, r in results.items():
        for i in range(len(r.latency_s)):
            row = {"image": i, "mode": MODE_LABELS[mode], "prediction": label_text(info, r.predictions[i])}
            if labels_true is not None:
                row["true"] = labels_true[i]
            if not info.multi_label:
                probs = guard.confidence(r.logits[i]).probabilities if guard is not None else r.scores[i]
                for c, lbl in info.labels.items():
                    row[f"P({lbl})" + (" calibrated" if guard is not None else "")] = round(float(probs[c]), 4)
            row["latency (ms)"] = round(1000 * float(r.latency_s[i]), 2)
            for stage in ("encrypt_s", "network_s", "queue_s", "server_s", "decrypt_s"):
                if stage in r.stages:
                    row[f"{stage[:-2]} (ms)"] = round(1000 * float(r.stages[stage][i]), 2)
            rows.append(row)
    return pd.DataFrame(rows)


def agreement_text(results: dict) -> str:
    from engine.study.evaluate import agreement

    modes = list(results)
    parts = [f"{MODE_LABELS[a]} vs {MODE_LABELS[b]}: {100 * agreement(results[a], results[b]):.0f}%"
             for i, a in enumerate(modes) for b in modes[i + 1:]]
    return " · ".join(parts)


def sizes_text(results: dict) -> str | None:
    fhe = results.get("fhe")
    if not fhe or not fhe.sizes:
        return None
    s = fhe.sizes
    return (f"Ciphertext sent: {s['ciphertext_bytes'] / 1024:.1f} KiB per image · encrypted result: "
            f"{s['result_bytes'] / 1024:.1f} KiB · evaluation keys (sent once): {s['eval_key_bytes'] / 2**20:.1f} MiB")
