"""Bit-width sweeps: train, compile and measure one architecture at several bit-widths.

Accuracy is measured on the validation split (float, quantized clear, FHE simulation); the
encrypted latency on a few validation images through the real client/server split. Each point
is cached with ``joblib.Memory``, so a repeated sweep returns at once.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Callable

import numpy as np
from joblib import Memory

from .config import PipelineConfig, default_cache_dir


def _memory(cache_dir: Path | None) -> Memory:
    return Memory(str(Path(cache_dir or default_cache_dir()) / "sweeps"), verbose=0)


def run_point(base: PipelineConfig, bits: int, rounding_bits: int, n_val: int, n_fhe: int, cache_dir: str | None) -> dict:
    """One sweep point (weights, activations and inputs all at ``bits``)."""
    import tempfile

    from . import metrics, registry
    from .data import load_split
    from .infer import Predictor
    from .train import train

    cfg = base.replace(
        model=dataclasses.replace(base.model, weight_bits=bits, act_bits=bits, input_bits=bits),
        compile=dataclasses.replace(base.compile, rounding_threshold_bits=max(rounding_bits, 2)),
    )
    result = train(cfg)
    with tempfile.TemporaryDirectory() as models_dir:
        saved = registry.save(result, f"sweep-b{bits}-r{rounding_bits}", Path(models_dir))
        p = Predictor(saved=saved, cache_dir=Path(cache_dir) if cache_dir else None)
        val = load_split(cfg.data, "val").head(n_val)
        res = p.run(val.images, ["float", "quantized", "simulate"])
        acc = {m: metrics.accuracy(val.labels, r.scores, val.info, saved.thresholds) for m, r in res.items()}
        lat = None
        if n_fhe:
            fhe = p.run(val.images[:n_fhe], ["fhe"])["fhe"]
            lat = float(np.median(fhe.latency_s))
        rep = p.compiled.report
        return {
            "bits": bits, "rounding_bits": rounding_bits, "hidden": list(cfg.model.hidden),
            "float_accuracy": acc["float"], "quantized_accuracy": acc["quantized"], "simulate_accuracy": acc["simulate"],
            "fhe_latency_median_s": lat, "max_bit_width": rep.max_bit_width, "pbs_count": rep.pbs_count,
            "keygen_s": p.client.keygen_s if p.client else None, "n_val": len(val),
        }


def sweep(
    base: PipelineConfig,
    bit_widths: list[int],
    rounding_bits: list[int],
    n_val: int = 0,
    n_fhe: int = 3,
    cache_dir: Path | None = None,
    progress: Callable[[int, int, str], None] | None = None,
) -> list[dict]:
    """Every (bits, rounding) point, cached; ``progress(done, total, message)`` after each."""
    cached = _memory(cache_dir).cache(run_point)
    grid = [(b, r) for b in bit_widths for r in rounding_bits]
    out = []
    for k, (b, r) in enumerate(grid):
        if progress:
            progress(k, len(grid), f"{b}-bit, rounding {r}")
        out.append(cached(base, b, r, n_val, n_fhe, str(cache_dir) if cache_dir else None))
    if progress:
        progress(len(grid), len(grid), "done")
    return out


