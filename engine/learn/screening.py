"""Uploaded files screened before they are encrypted: decoded into the model's input, checked by
the model's :class:`engine.learn.guard.Guard`, and the answers laid out one row per file."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .guard import Guard, Verdict


@dataclass
class Screened:
    """One uploaded file, decoded and checked (``error`` set when it could not be decoded)."""

    name: str
    image: np.ndarray | None
    original: np.ndarray | None
    verdict: Verdict | None
    notes: list[str] = field(default_factory=list)
    error: str | None = None


def screen(files: list[tuple[str, bytes]], guard: Guard | None, size: int, channels: int) -> list[Screened]:
    """Decode each uploaded file (zips expanded) into the model's input and check it."""
    from .images import ImageError, expand_uploads, load_image

    out = []
    for name, data in expand_uploads(files):
        try:
            loaded = load_image(data, size, channels, name=name,
                                sharpness=guard.sharpness if guard is not None else None,
                                framing=guard.framing if guard is not None else None)
        except ImageError as exc:
            out.append(Screened(name, None, None, None, error=str(exc)))
            continue
        verdict = guard.check(loaded.array, loaded.original) if guard is not None else None
        if verdict is not None and not verdict.foreign and any(n.startswith("softened") for n in loaded.notes):
            # softening smooths a pattern (a sine wave, a checkerboard) into something scan-like:
            # what the image was before it must pass the structure checks too
            from .images import to_model_input

            plain = guard.check(to_model_input(loaded.original, size, channels, framing=guard.framing), loaded.original)
            if plain.foreign and any("patterns" in r or "structure" in r for r in plain.reasons):
                verdict = plain
        out.append(Screened(name, loaded.array, loaded.original, verdict, loaded.notes))
    return out


def batch_rows(items: list[Screened], logits: np.ndarray, predictions, label_text, guard: Guard | None) -> list[dict]:
    """One row per uploaded file: the encrypted prediction (``logits``/``predictions`` are for the
    decodable items, in order), its calibrated confidence and the guard's warning."""
    rows, k = [], 0
    for it in items:
        if it.error is not None:
            rows.append({"file": it.name, "prediction": None, "confidence": None, "uncertain": None,
                         "warning": f"not classified: {it.error}"})
            continue
        conf = guard.confidence(logits[k], it.verdict) if guard is not None else None
        rows.append({"file": it.name, "prediction": label_text(predictions[k]),
                     "confidence": round(conf.shown, 4) if conf and conf.shown is not None else None,
                     "uncertain": conf.uncertain if conf else None,
                     "warning": it.verdict.message if it.verdict is not None and it.verdict.foreign else ""})
        k += 1
    return rows
