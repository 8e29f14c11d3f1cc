"""Metrics per mode, agreement between modes, latency statistics; JSON and a text table."""

from __future__ import annotations

import itertools
import json
import platform
from pathlib import Path

import numpy as np

from ..config import REPO_ROOT
from ..learn import metrics
from ..learn.data import Split
from .infer import ModeResult, Predictor, ProgressFn


def latency_stats(seconds: np.ndarray) -> dict:
    s = np.asarray(seconds, dtype=np.float64)
    if not len(s):
        return {"latency_median_s": None, "latency_p90_s": None}
    return {"latency_median_s": float(np.median(s)), "latency_p90_s": float(np.percentile(s, 90))}


def agreement(a: ModeResult, b: ModeResult) -> float:
    pa, pb = a.predictions.reshape(len(a.predictions), -1), b.predictions.reshape(len(b.predictions), -1)
    return float((pa == pb).all(axis=1).mean()) if len(pa) else float("nan")


def mode_summary(res: ModeResult, split: Split, thresholds=None) -> dict:
    out = {
        "accuracy": metrics.accuracy(split.labels, res.scores, split.info, thresholds),
        "balanced_accuracy": metrics.balanced_accuracy(split.labels, res.scores, split.info),
        "auc": metrics.auc(split.labels, res.scores, split.info),
        **latency_stats(res.latency_s),
    }
    for stage, values in res.stages.items():
        out[f"{stage.removesuffix('_s')}_median_s"] = float(np.median(values))
    out.update(res.sizes)
    return out


def summarize(predictor: Predictor, split: Split, results: dict[str, ModeResult]) -> dict:
    saved = predictor.saved
    report = {
        "dataset": saved.dataset,
        "model": saved.name,
        "model_hash": saved.hash,
        "split": split.split,
        "n": len(split),
        "modes": {m: mode_summary(r, split, saved.thresholds) for m, r in results.items()},
        "agreement": {f"{a}_{b}": agreement(results[a], results[b]) for a, b in itertools.combinations(results, 2)},
        "machine": machine_info(),
    }
    if "simulate" in results and "fhe" in results:
        report["agreement_simulate_fhe"] = report["agreement"]["simulate_fhe"]
    if predictor.compiled is not None:
        circuit = predictor.compiled.report.to_dict()
        circuit.pop("files", None)
        if predictor.client is not None and predictor.client.has_keys:
            circuit["keygen_s"] = predictor.client.keygen_s
            circuit["eval_key_bytes"] = len(predictor.client.evaluation_keys())
        report["circuit"] = circuit
    return report


def evaluate(predictor: Predictor, split: Split, modes, progress: ProgressFn | None = None,
             backend: str | None = None, scheduler: str | None = None, batch_size: int = 1) -> dict:
    """Metrics per mode on ``split``. With ``backend`` the encrypted mode runs as one batch
    spread over processes (``local``) or a Dask cluster (``dask``), ``batch_size`` images per
    encrypted call, and throughput is reported."""
    from .infer import parse_modes

    modes = parse_modes(modes)
    if not backend or "fhe" not in modes:
        return summarize(predictor, split, predictor.run(split.images, modes, progress))
    results = predictor.run(split.images, [m for m in modes if m != "fhe"], progress)
    results["fhe"], batch = predictor.run_distributed(split.images, backend, scheduler, batch_size=batch_size)
    report = summarize(predictor, split, results)
    report["distributed"] = {"backend": backend, "workers": batch.n_workers, "wall_s": batch.wall_s,
                             "images_per_call": batch_size,
                             "server_wall_s": batch.server_wall_s,
                             "throughput_img_per_s": len(split) / batch.wall_s if batch.wall_s else None}
    return report


def machine_info() -> dict:
    import os

    cpu = platform.processor() or ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "python": platform.python_version()}


def write_json(report: dict, path: Path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2, default=_jsonable))


def _jsonable(o):
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    raise TypeError(type(o))


def _fmt(v, kind: str) -> str:
    if v is None:
        return "-"
    if kind == "pct":
        return f"{100 * v:.1f}%"
    if kind == "ms":
        return f"{1000 * v:.2f} ms" if v < 1 else f"{v:.2f} s"
    return str(v)


def table(report: dict) -> str:
    """Human-readable summary of an evaluation report."""
    rows = [("mode", "accuracy", "AUC", "median/img", "p90/img")]
    for mode, m in report["modes"].items():
        rows.append((mode, _fmt(m["accuracy"], "pct"), "-" if m["auc"] is None else f"{m['auc']:.3f}",
                     _fmt(m["latency_median_s"], "ms"), _fmt(m["latency_p90_s"], "ms")))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = [f"{report['dataset']} / {report['model']} on {report['n']} {report['split']} images"]
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in rows]
    fhe = report["modes"].get("fhe")
    if fhe:
        lines.append(
            "fhe stages (median): encrypt {} | server {} | decrypt {}; ciphertext {:,} B, result {:,} B".format(
                _fmt(fhe.get("encrypt_median_s"), "ms"), _fmt(fhe.get("server_median_s"), "ms"),
                _fmt(fhe.get("decrypt_median_s"), "ms"), fhe.get("ciphertext_bytes", 0), fhe.get("result_bytes", 0)))
    if report.get("agreement"):
        lines.append("agreement: " + ", ".join(f"{k} {100 * v:.1f}%" for k, v in report["agreement"].items()))
    c = report.get("circuit")
    if c:
        lines.append(circuit_line(c))
    return "\n".join(lines)


def circuit_line(c: dict) -> str:
    parts = [f"circuit: max bit-width {c['max_bit_width']}", f"{c['pbs_count']} PBS",
             f"compile {c['compile_s']:.2f} s", "from cache" if c.get("from_cache") else "freshly compiled"]
    if c.get("keygen_s") is not None:
        parts.append(f"keygen {c['keygen_s']:.2f} s")
    if c.get("eval_key_bytes"):
        parts.append(f"eval keys {c['eval_key_bytes'] / 1e6:.1f} MB")
    return ", ".join(parts)


RESULTS_DIR = REPO_ROOT / "bench" / "results"


def results_dir() -> Path:
    """Where benchmark reports are stored: ``$ENGINE_RESULTS_DIR``, else ``bench/results``."""
    import os

    return Path(os.environ.get("ENGINE_RESULTS_DIR") or RESULTS_DIR)


def load_reports(folder: Path | None = None) -> list[dict]:
    """Stored evaluation/benchmark reports (``*.json`` with a ``modes`` section)."""
    out = []
    for path in sorted(Path(folder or results_dir()).glob("*.json")):
        try:
            rep = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            continue
        if isinstance(rep, dict) and isinstance(rep.get("modes"), dict):
            rep.setdefault("source", path.name)
            out.append(rep)
    return out


def target_rows(reports: list[dict]) -> list[dict]:
    """One flat row per (benchmark report, target): the Benchmarks page's targets table."""
    return [{"dataset": r.get("dataset"), "model": r.get("model"), "source": r.get("source"), **t}
            for r in reports for t in r.get("targets", [])]


def report_rows(reports: list[dict]) -> list[dict]:
    """One flat row per (report, mode): the Benchmarks table."""
    rows = []
    for rep in reports:
        compiled = (rep.get("circuit") or {}).get("compile") or {}
        for mode, m in rep["modes"].items():
            rows.append({
                "dataset": rep.get("dataset"), "model": rep.get("model"), "n": rep.get("n"), "mode": mode,
                "rounding_bits": compiled.get("rounding_threshold_bits"), "p_error": compiled.get("p_error"),
                "accuracy": m.get("accuracy"), "balanced_accuracy": m.get("balanced_accuracy"), "auc": m.get("auc"),
                "latency_median_ms": None if m.get("latency_median_s") is None else 1000 * m["latency_median_s"],
                "latency_p90_ms": None if m.get("latency_p90_s") is None else 1000 * m["latency_p90_s"],
                "source": rep.get("source"),
            })
    return rows
