"""Design-space exploration: train, compile and measure configurations; bit-width sweeps,
searches and their Pareto front (validation accuracy against encrypted latency).

Accuracy is measured on the validation split (float, quantized clear, FHE simulation); the
encrypted latency on a few validation images through the real client/server split. Each point
is cached with ``joblib.Memory``, so a repeated sweep or search returns at once.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
from pathlib import Path
from typing import Callable

import numpy as np
from joblib import Memory

from ..config import PipelineConfig, default_cache_dir

ProgressFn = Callable[[int, int, str], None]



def _memory(cache_dir: Path | None) -> Memory:
    return Memory(str(Path(cache_dir or default_cache_dir()) / "sweeps"), verbose=0)


def trained(cfg: PipelineConfig, cache_dir: Path | None = None):
    """The model ``cfg`` trains (a :class:`~engine.learn.registry.SavedModel`), trained once per data,
    model and training settings: points that differ only in compile settings share it."""
    import hashlib

    from ..learn import registry
    from ..config import CompileConfig
    from ..learn.train import train

    # Noise-aware training reads the rounding bits: then the compile settings are part of the key.
    key_cfg = cfg if cfg.train.rounding_noise else cfg.replace(compile=CompileConfig())
    name = "point-" + hashlib.sha256(key_cfg.to_json().encode()).hexdigest()[:16]
    root = Path(cache_dir or default_cache_dir()) / "sweeps" / "models"
    try:
        return registry.load(cfg.data.dataset, name, root)
    except registry.ModelNotFound:
        return registry.save(train(cfg), name, root, overwrite=True)


def measure(cfg: PipelineConfig, n_val: int, n_fhe: int, cache_dir: str | None) -> dict:
    """Train ``cfg`` (or reuse its trained model), compile it, and measure validation accuracy
    and encrypted latency."""
    from ..learn import metrics
    from . import stability
    from ..learn.data import load_split
    from .infer import Predictor

    saved = trained(cfg, Path(cache_dir) if cache_dir else None)
    p = Predictor(saved=saved, compile_config=cfg.compile, cache_dir=Path(cache_dir) if cache_dir else None)
    val = load_split(cfg.data, "val").head(n_val)
    res = p.run(val.images, ["float", "quantized", "simulate"])
    acc = {m: metrics.accuracy(val.labels, r.scores, val.info, saved.thresholds) for m, r in res.items()}
    # Repeated simulations of the validation images: how often the circuit's noise flips a
    # prediction (mean agreement over pairs of runs), the validation proxy for "encrypted
    # agrees with simulation". Training images would flatter it: their margins are wider.
    agree = stability.measure(p, val.images, first=res["simulate"]).agreement
    balanced = metrics.balanced_accuracy(val.labels, res["simulate"].scores, val.info)
    fhe = p.run(val.images[:n_fhe], ["fhe"])["fhe"] if n_fhe else None
    sample = val.head(n_fhe) if n_fhe else None
    rep = p.compiled.report
    m, c = cfg.model, cfg.compile
    return {
        "hidden": list(m.hidden), "bits": m.weight_bits, "act_bits": m.act_bits, "input_bits": m.input_bits,
        "input_pool": m.input_pool, "max_active_inputs": m.max_active_inputs,
        "rounding_bits": c.rounding_threshold_bits, "p_error": c.p_error, "epochs": cfg.train.epochs,
        "augment_shift": cfg.train.augment_shift, "augment_rotate": cfg.train.augment_rotate,
        "augment_scale": cfg.train.augment_scale, "best_epoch": saved.metrics.get("best_epoch"),
        "float_accuracy": acc["float"], "quantized_accuracy": acc["quantized"], "simulate_accuracy": acc["simulate"],
        "simulate_balanced_accuracy": balanced, "simulate_agreement": agree,
        "float_auc": metrics.auc(val.labels, res["float"].scores, val.info),
        "simulate_auc": metrics.auc(val.labels, res["simulate"].scores, val.info),
        # Real encryption on the first n_fhe validation images, beside simulation on the same ones.
        "fhe_accuracy": metrics.accuracy(sample.labels, fhe.scores, val.info, saved.thresholds) if fhe else None,
        "simulate_sample_accuracy": metrics.accuracy(sample.labels, res["simulate"].scores[:n_fhe], val.info,
                                                     saved.thresholds) if fhe else None,
        "n_fhe": n_fhe,
        "evaluation_key_bytes": p.remote.evaluation_key_bytes if fhe else None,
        "fhe_latency_median_s": float(np.median(fhe.latency_s)) if fhe else None,
        "fhe_server_median_s": float(np.median(fhe.stages["server_s"])) if fhe else None,
        "max_bit_width": rep.max_bit_width, "pbs_count": rep.pbs_count,
        "keygen_s": p.client.keygen_s if p.client else None, "n_val": len(val),
        "config": cfg.to_dict(),
    }


# The framing shift every point is also scored under: validation images moved by up to 2 px,
# turned by up to 10 degrees and zoomed by up to 10% (uploads are framed unlike MedMNIST's crops),
# three copies with a fixed seed so every point sees the same images.
SHIFT = (2, 10.0, 0.1)
SHIFT_COPIES = 3


def shifted_validation(data_cfg, copies: int = SHIFT_COPIES, seed: int = 0):
    """(uint8 images, labels, info): ``copies`` framing-shifted copies of the validation split."""
    from ..learn.data import load_split
    from ..learn.augment import random_affine

    val = load_split(data_cfg, "val")
    rng = np.random.default_rng(seed)
    images = [np.clip(np.rint(random_affine(val.images, *SHIFT, rng)), 0, 255).astype(np.uint8) for _ in range(copies)]
    return np.concatenate(images), np.concatenate([val.labels] * copies), val.info


def measure_shifted(cfg: PipelineConfig, cache_dir: str | None) -> dict:
    """Accuracy and balanced accuracy in FHE simulation on the framing-shifted validation images."""
    from ..learn import metrics
    from .infer import Predictor

    saved = trained(cfg, Path(cache_dir) if cache_dir else None)
    p = Predictor(saved=saved, compile_config=cfg.compile, cache_dir=Path(cache_dir) if cache_dir else None)
    images, labels, info = shifted_validation(cfg.data)
    res = p.run(images, ["simulate"])["simulate"]
    return {"shifted_accuracy": metrics.accuracy(labels, res.scores, info, saved.thresholds),
            "shifted_balanced_accuracy": metrics.balanced_accuracy(labels, res.scores, info)}


def add_shifted(rows: list[dict], cache_dir: Path | None = None, progress: ProgressFn | None = None) -> list[dict]:
    """Add the framing-shift figures to every row that lacks them (cached per config)."""
    cached = _memory(cache_dir).cache(measure_shifted)
    todo = [r for r in rows if "shifted_balanced_accuracy" not in r]
    for k, r in enumerate(todo):
        if progress:
            progress(k, len(todo), f"framing shift {k + 1}/{len(todo)}")
        r.update(cached(PipelineConfig.from_dict(r["config"]), str(cache_dir) if cache_dir else None))
    return rows


def merge_points(earlier: list[dict], fresh: list[dict]) -> list[dict]:
    """Earlier searches' points and this one's (same measurement, validation only); a point
    measured again replaces its earlier measurement."""
    key = lambda r: json.dumps(r["config"], sort_keys=True)  # noqa: E731
    again = {key(r) for r in fresh}
    return [r for r in earlier if key(r) not in again] + fresh


def run_grid(configs: list[PipelineConfig], n_val: int = 0, n_fhe: int = 3, cache_dir: Path | None = None,
             progress: ProgressFn | None = None, labels: list[str] | None = None) -> list[dict]:
    """Measure every config (cached); ``progress(done, total, message)`` before each and at the end."""
    cached = _memory(cache_dir).cache(measure)
    out = []
    for k, cfg in enumerate(configs):
        if progress:
            progress(k, len(configs), labels[k] if labels else f"point {k + 1}/{len(configs)}")
        out.append(cached(cfg, n_val, n_fhe, str(cache_dir) if cache_dir else None))
    if progress:
        progress(len(configs), len(configs), "done")
    return out


def sweep_configs(base: PipelineConfig, bit_widths: list[int], rounding_bits: list[int]) -> list[tuple[str, PipelineConfig]]:
    """(label, config) for weights, activations and inputs all at each bit-width, per rounding setting."""
    return [(f"{b}-bit, rounding {r}", base.replace(
        model=dataclasses.replace(base.model, weight_bits=b, act_bits=b, input_bits=b),
        compile=dataclasses.replace(base.compile, rounding_threshold_bits=max(r, 2))))
        for r, b in itertools.product(rounding_bits, bit_widths)]


def iter_grid(points: list[tuple[str, PipelineConfig]], n_val: int = 0, n_fhe: int = 3, cache_dir: Path | None = None):
    """Measure each (label, config) in turn (cached); yields (label, row) as each one finishes."""
    cached = _memory(cache_dir).cache(measure)
    for label, cfg in points:
        yield label, cached(cfg, n_val, n_fhe, str(cache_dir) if cache_dir else None)


def sweep(base: PipelineConfig, bit_widths: list[int], rounding_bits: list[int], n_val: int = 0, n_fhe: int = 3,
          cache_dir: Path | None = None, progress: ProgressFn | None = None) -> list[dict]:
    """Weights, activations and inputs all at each bit-width, for each rounding setting."""
    points = sweep_configs(base, bit_widths, rounding_bits)
    return run_grid([c for _, c in points], n_val, n_fhe, cache_dir, progress, [lbl for lbl, _ in points])


def is_stable(r: dict, min_agreement: float | None) -> bool:
    """Whether a point's repeated simulations agree on at least ``min_agreement`` (None: any)."""
    return min_agreement is None or r.get("simulate_agreement", 1.0) >= min_agreement


def pareto_front(rows: list[dict], x: str = "fhe_latency_median_s", min_agreement: float | None = None) -> list[dict]:
    """Points no other point beats on both lower latency and a higher validation score (among
    points whose repeated simulations agree on at least ``min_agreement``, if given)."""
    pts = [r for r in rows if r.get(x) is not None and is_stable(r, min_agreement)]
    pts.sort(key=lambda r: (r[x], -score(r)))
    front, best = [], -np.inf
    for r in pts:
        if score(r) > best:
            front.append(r)
            best = score(r)
    return front


def score(r: dict) -> float:
    """A point's validation score: simulated balanced accuracy where defined (single-label,
    class-weighted training), else simulated accuracy; averaged with the same figure on the
    framing-shifted validation images where measured (:func:`add_shifted`)."""
    balanced = r.get("simulate_balanced_accuracy") is not None and r["config"]["train"].get("class_weighting", True)
    plain = r["simulate_balanced_accuracy"] if balanced else r["simulate_accuracy"]
    shifted = r.get("shifted_balanced_accuracy" if balanced else "shifted_accuracy")
    return plain if shifted is None else (plain + shifted) / 2


def choose(rows: list[dict], latency_target_s: float, min_agreement: float = 0.99, tolerance: float = 0.01) -> dict:
    """Pick a point on validation figures only: accuracy first, then speed.

    Candidates are points whose repeated simulations agree on at least ``min_agreement`` of
    the images (all points if none does) and score within ``tolerance`` (one point) of the best
    candidate: speed never buys more than that much validation score. Among them, the fastest
    within the latency target if any is, else the fastest. Compile settings (rounding,
    ``p_error``) do not change a trained model, so score differences between them are
    simulation noise: among the chosen model's candidates, take the most stable one, then the
    fastest.
    """
    stable = [r for r in rows if is_stable(r, min_agreement)] or rows
    timed = [r for r in stable if r.get("fhe_latency_median_s") is not None] or stable
    top = max(score(r) for r in timed)
    near = [r for r in timed if score(r) >= top - tolerance - 1e-12]
    lat = lambda r: r.get("fhe_latency_median_s") or np.inf  # noqa: E731
    fastest = min(near, key=lat)
    same_model = [r for r in near if _model_key(r) == _model_key(fastest)
                  and (lat(r) <= latency_target_s) == (lat(fastest) <= latency_target_s)]
    return max(same_model, key=lambda r: (r.get("simulate_agreement", 1.0), -lat(r)))


def _model_key(r: dict) -> str:
    """The trained model behind a point: its config without the compile settings."""
    return json.dumps({k: v for k, v in r["config"].items() if k != "compile"}, sort_keys=True)


def point_label(r: dict) -> str:
    hidden = "-".join(map(str, r["hidden"])) or "linear"
    prune = f" prune{r['max_active_inputs']}" if r.get("max_active_inputs") else ""
    a, i = r.get("act_bits", r["bits"]), r.get("input_bits", r["bits"])
    bits = f"b{r['bits']}" if r["bits"] == a == i else f"w{r['bits']}a{a}i{i}"
    kd = " kd" if r.get("config", {}).get("train", {}).get("distill") else ""
    return f"h{hidden} {bits} pool{r['input_pool']}{prune}{kd} r{r['rounding_bits']} p{r['p_error']:g}"


def pareto_figure(rows: list[dict], title: str, latency_target_s: float | None = None, chosen: dict | None = None,
                  min_agreement: float | None = None):
    import plotly.graph_objects as go

    front = pareto_front(rows, min_agreement=min_agreement)
    fig = go.Figure()
    stable = [is_stable(r, min_agreement) for r in rows]
    fig.add_scatter(x=[1000 * r["fhe_latency_median_s"] for r in rows], y=[score(r) for r in rows],
                    mode="markers", name="configurations (x: repeated simulations agree on too few images)",
                    text=[f"{point_label(r)}<br>agreement {100 * r.get('simulate_agreement', 1.0):.1f}%" for r in rows],
                    marker=dict(size=9, color=[r["pbs_count"] for r in rows], colorscale="Viridis",
                                symbol=["circle" if ok else "x" for ok in stable],
                                colorbar=dict(title="PBS"), showscale=True))
    fig.add_scatter(x=[1000 * r["fhe_latency_median_s"] for r in front], y=[score(r) for r in front],
                    mode="lines+markers", name="Pareto front" + (" (stable points)" if min_agreement else ""),
                    line=dict(color="crimson"), text=[point_label(r) for r in front])
    if chosen is not None:
        fig.add_scatter(x=[1000 * chosen["fhe_latency_median_s"]], y=[score(chosen)], mode="markers+text",
                        name=f"chosen: {point_label(chosen)}", text=["chosen"], textposition="top center",
                        marker=dict(size=18, symbol="star", color="orange", line=dict(color="black", width=1)))
    if latency_target_s:
        fig.add_vline(x=1000 * latency_target_s, line_dash="dot", annotation_text=f"{1000 * latency_target_s:.0f} ms target")
    fig.update_layout(title=title, xaxis_title="encrypted latency per image, median (ms)",
                      yaxis_title="validation score (FHE simulation; balanced accuracy)", height=560, width=900,
                      legend=dict(orientation="h", yanchor="top", y=-0.15))
    return fig


SWEEP_COLUMNS = [  # (key, header, format)
    ("bits", "bits (w=a=in)", "{}"), ("rounding_bits", "rounding", "{}"),
    ("float_accuracy", "float acc", "{:.1%}"), ("quantized_accuracy", "quantized acc", "{:.1%}"),
    ("simulate_accuracy", "simulated acc", "{:.1%}"), ("fhe_accuracy", "encrypted acc (sample)", "{:.1%}"),
    ("simulate_auc", "AUC (simulated)", "{:.3f}"), ("simulate_agreement", "sim. agreement", "{:.1%}"),
    ("fhe_latency_median_s", "encrypted ms", "{:.0f}"), ("keygen_s", "keygen s", "{:.1f}"),
    ("evaluation_key_bytes", "eval keys MB", "{:.1f}"), ("max_bit_width", "max bits", "{}"), ("pbs_count", "PBS", "{}"),
]


def sweep_cells(r: dict) -> dict[str, str]:
    """One sweep point as display text, keyed by :data:`SWEEP_COLUMNS` headers."""
    def cell(key, fmt):
        v = r.get(key)
        if v is None:
            return "-"
        if key == "fhe_latency_median_s":
            v = 1000 * v
        if key == "evaluation_key_bytes":
            v = v / 1e6
        return fmt.format(v)
    return {head: cell(key, fmt) for key, head, fmt in SWEEP_COLUMNS}


def sweep_table(rows: list[dict]) -> str:
    """A Markdown table of sweep points (validation figures)."""
    head = "| " + " | ".join(h for _, h, _ in SWEEP_COLUMNS) + " |"
    sep = "|" + "---|" * len(SWEEP_COLUMNS)
    body = ["| " + " | ".join(sweep_cells(r).values()) + " |"
            for r in sorted(rows, key=lambda r: (r["rounding_bits"], r["bits"]))]
    return "\n".join([head, sep, *body])
