"""What the bit-width explorer shows: shipped sweep and search results, and their charts.

Sweeps (``python -m engine sweep``) and searches (``python -m engine search``) are committed as
JSON under ``bench/results/``, so the curves need no dataset file and no computation. Figures
are plotly; nothing here knows the dashboard.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from ..config import REPO_ROOT
from .sweep import iter_grid, pareto_figure, sweep_cells
from .sweep import sweep_configs as sweep_points  # noqa: F401 - (label, config) per point, for the page

RESULTS_DIR = REPO_ROOT / "bench" / "results"


@dataclass(frozen=True)
class Metric:
    label: str
    axis: str
    scale: float = 1.0  # value * scale is what is drawn
    percent: bool = False


METRICS = {
    "simulate_accuracy": Metric("Validation accuracy, FHE simulation", "validation accuracy (%)", 100, True),
    "fhe_accuracy": Metric("Validation accuracy, real encryption (sample)", "validation accuracy (%)", 100, True),
    "quantized_accuracy": Metric("Validation accuracy, quantized clear", "validation accuracy (%)", 100, True),
    "float_accuracy": Metric("Validation accuracy, float", "validation accuracy (%)", 100, True),
    "simulate_auc": Metric("Validation AUC, FHE simulation", "AUC"),
    "simulate_agreement": Metric("Agreement of repeated simulations", "agreement between runs (%)", 100, True),
    "fhe_latency_median_s": Metric("Encrypted latency per image (median)", "latency per image (ms)", 1000),
    "keygen_s": Metric("Key generation time", "key generation (s)"),
    "evaluation_key_bytes": Metric("Evaluation-key size", "evaluation keys (MB)", 1e-6),
    "max_bit_width": Metric("Largest lookup bit-width", "max bit-width (bits)"),
    "pbs_count": Metric("Programmable bootstraps (PBS) per image", "PBS per image"),
}
ACCURACY_METRICS = ["simulate_accuracy", "fhe_accuracy", "quantized_accuracy", "float_accuracy"]


def _read(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def shipped_datasets(results_dir: Path = RESULTS_DIR) -> list[str]:
    return sorted(p.name[: -len("_sweep.json")] for p in Path(results_dir).glob("*_sweep.json"))


def load_sweep(dataset: str, results_dir: Path = RESULTS_DIR) -> dict | None:
    return _read(Path(results_dir) / f"{dataset}_sweep.json")


def load_search(dataset: str, results_dir: Path = RESULTS_DIR) -> dict | None:
    return _read(Path(results_dir) / f"{dataset}_search.json")


def series_of(row: dict) -> str:
    return f"rounding {row['rounding_bits']}" + (" (new)" if row.get("new") else "")


def series_names(rows: list[dict]) -> list[str]:
    return sorted({series_of(r) for r in rows})


def curves_figure(rows: list[dict], metric: str, series: list[str] | None = None, overlay: list[str] | None = None):
    """One line per rounding setting: ``metric`` against the bit-width; ``overlay`` metrics dashed."""
    import plotly.graph_objects as go

    m = METRICS[metric]
    fig = go.Figure()
    df = pd.DataFrame(rows)
    df["series"] = [series_of(r) for r in rows]
    for name, part in df.sort_values("bits").groupby("series"):
        if series is not None and name not in series:
            continue
        for k, dash in [(metric, "solid"), *[(o, "dash") for o in overlay or []]]:
            if k not in part or part[k].isna().all():
                continue
            mk = METRICS[k]
            fig.add_scatter(x=part["bits"].tolist(), y=(part[k] * mk.scale).tolist(), mode="lines+markers", line=dict(dash=dash),
                            name=f"{name}: {mk.label}" if overlay else name,
                            hovertemplate="%{x}-bit<br>%{y:.3~f}<extra>" + name + "</extra>")
    if metric == "fhe_latency_median_s":
        fig.add_hline(y=150, line_dash="dot", annotation_text="published reference: 150 ms")
    fig.update_layout(xaxis=dict(title="bit-width of weights, activations and inputs (bits)", dtick=1),
                      yaxis=dict(title=m.axis, ticksuffix="" if not m.percent else ""),
                      height=420, margin=dict(t=30), legend=dict(orientation="h", yanchor="top", y=-0.2))
    return fig


def sweep_frame(rows: list[dict]) -> pd.DataFrame:
    """The sweep as a readable table (one row per point, new points last)."""
    ordered = sorted(rows, key=lambda r: (r.get("new", False), r["rounding_bits"], r["bits"]))
    return pd.DataFrame([{**sweep_cells(r), "new": bool(r.get("new"))} for r in ordered])


def pareto(search: dict):
    """The search's Pareto figure: chosen point marked, configurations on hover."""
    return pareto_figure(search["points"], f"{search['dataset']}: validation score against encrypted latency",
                         search.get("target_s"), search.get("chosen"), search.get("min_agreement"))


def run_points(points, n_val: int, n_fhe: int, cache_dir: Path | None = None):
    """Yields (label, row) per point as it finishes; rows are marked new (not shipped)."""
    for label, row in iter_grid(points, n_val, n_fhe, cache_dir):
        yield label, {**row, "new": True}
