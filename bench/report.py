"""Turn bench/results/ into the tables the documentation shows (docs/generated/*.md).

    python bench/report.py            # write docs/generated/
    python bench/report.py --check    # exit 1 if docs/generated/ is not what the results give

Nothing in the docs' figure tables is copied by hand: each table here is read from one results
file and says which file, its date (the date the file records, else the date of the commit that
last changed it) and the machine it came from. The docs include these files
(``--8<-- "docs/generated/NAME.md"``), and the test suite runs ``--check``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

RESULTS = REPO / "bench" / "results"
OUT = REPO / "docs" / "generated"


def pct(v) -> str:
    return "-" if v is None else f"{100 * v:.1f}%"


def ms(v) -> str:
    return "-" if v is None else f"{1000 * v:.0f} ms"


def secs(v) -> str:
    return "-" if v is None else f"{v:.2f} s"


def _git(*args: str) -> str:
    try:
        return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, timeout=30).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def committed_date(path: Path) -> str:
    """The date of the commit that last changed ``path`` (a shallow clone does not know it)."""
    if _git("rev-parse", "--is-shallow-repository") != "false":
        return "date not recorded"
    return _git("log", "-1", "--format=%cs", "--", str(path.relative_to(REPO))) or "not committed yet"


def source(path: Path, data: dict | None = None) -> str:
    """The line under each table: file, date, machine."""
    data = data if isinstance(data, dict) else {}
    date = data.get("date") or committed_date(path)
    m = data.get("machine") or {}
    machine = f"{m.get('cpu') or 'CPU not recorded'}, {m.get('cores', '?')} cores" if m else "machine not recorded"
    return f"*Source: `{path.relative_to(REPO)}`, {date}, {machine}.*"


def load(name: str) -> tuple[Path, dict]:
    path = RESULTS / name
    return path, json.loads(path.read_text())


# -- the tables
def benchmark(dataset: str) -> str:
    from engine.study.bench import markdown

    path, r = load(f"{dataset}.json")
    body = markdown(r).strip().splitlines()
    body = [line for line in body if not line.startswith("Machine:")]  # said in the source line
    return "\n".join(body) + "\n\n" + source(path, r) + "\n"


def real_images() -> str:
    rows = ["| images | model | n | mode | accuracy | balanced accuracy | AUC | recall per class | flagged | answers at >= 90% confidence: share, right |",
            "|---|---|---|---|---|---|---|---|---|---|"]
    notes = []
    for name in ("real/pneumoniamnist_test_scatter3.json", "real/pneumoniamnist_test_grid10.json",
                 "real/chest_xray_224.json", "real/chest_xray_224_grid10.json", "real/busi.json"):
        path, r = load(name)
        what = r.get("source") or f"{r['dataset']} {r.get('split', '')} split"
        for mode, m in r["modes"].items():
            recall = ", ".join(f"{k} {pct(v)}" for k, v in (m.get("recall") or {}).items()) or "-"
            rows.append(f"| {Path(what).name if '/' in what else what} | `{r['model']}` | {m.get('n', r.get('n'))} | {mode} | "
                        f"{pct(m.get('accuracy'))} | {pct(m.get('balanced_accuracy'))} | "
                        f"{'-' if m.get('auc') is None else format(m['auc'], '.3f')} | {recall} | "
                        f"{pct(r.get('flagged_share')) if 'flagged_share' in r else '-'} | "
                        f"{pct(r.get('confident_share')) + ', ' + pct(r.get('accuracy_confident')) if 'confident_share' in r else '-'} |")
        notes.append(source(path, r))
    return "\n".join(rows) + "\n\n" + "\n".join(f"- {n}" for n in notes) + "\n"


def corrections() -> str:
    path, r = load("real/chest_xray_224_corrections.json")
    rows = [f"`{r['model']}` on `{r['images']}`, {r['mode']} mode.", "",
            "| correction | accuracy | balanced | crops of 100/85/75% agree | stretched back by 1.2 | >= 90% confident: share, right |",
            "|---|---|---|---|---|---|"]
    for x in r["rows"]:
        rows.append(f"| {x['setting']} | {pct(x['accuracy'])} | {pct(x['balanced'])} | {pct(x.get('framing_agreement'))} | "
                    f"{pct(x.get('stretched_accuracy'))} | {pct(x.get('confident_share'))}, {pct(x.get('accuracy_confident'))} |")
    return "\n".join(rows) + "\n\n" + source(path, r) + "\n"


def framing() -> str:
    path, r = load("real/framing.json")
    shares = "/".join(f"{100 * x:.0f}" for x in r.get("shares", []))
    rows = [f"`{r['model']}` on `{r['images']}` (quantized): the squeeze estimator's settings (keep s x scale of the "
            "width when the estimate is below the threshold).", "",
            f"| setting | accuracy | recall per class | >= 90% confident: share, right | crops of {shares}% agree | "
            "validation images uploaded as PNG |", "|---|---|---|---|---|---|"]
    for x in r["rows"]:
        recall = ", ".join(f"{k} {pct(v)}" for k, v in (x.get("recall") or {}).items())
        rows.append(f"| {x['setting']} | {pct(x['accuracy'])} | {recall} | {pct(x.get('confident_share'))}, "
                    f"{pct(x.get('accuracy_confident'))} | {pct(x.get('framing_agreement'))} | "
                    f"{pct((x.get('accuracy_as_uploads') or {}).get('val'))} |")
    return "\n".join(rows) + "\n\n" + source(path, r) + "\n"


def service_load() -> str:
    from engine.serve.loadtest import markdown

    out = []
    path, r = load("tenants.json")
    runs = [v for v in r["load"].values() if isinstance(v, dict) and "clients" in v]
    out += [f"One service process, `{runs[0]['model']}` (`bench/tenants_report.py`):", "", markdown(runs).strip(), "",
            source(path, r), ""]
    path, r = load("serve_pneumoniamnist.json")
    runs = r["loadtest"] if isinstance(r["loadtest"], list) else list(r["loadtest"].values())
    runs = [x for x in runs if isinstance(x, dict) and "clients" in x]
    out += [f"The service's first load tests, `{r['model']}` (`bench/serve_report.py`):", "", markdown(runs).strip(), "",
            source(path, r)]
    return "\n".join(out) + "\n"


def scaleout() -> str:
    path = RESULTS / "scaleout.md"
    if not path.exists():
        return "*No scale-out run yet: `python bench/scaleout.py` writes it.*\n"
    data = json.loads(path.with_suffix(".json").read_text())
    body = [line for line in path.read_text().splitlines() if not line.startswith("# ") and "Generated by" not in line]
    return "\n".join(body).strip() + "\n\n" + source(path.with_suffix(".json"), data) + "\n"


def startup() -> str:
    rows = ["| run | commit | page title | button shown | click | first encrypted answer | after the click |",
            "|---|---|---|---|---|---|---|"]
    notes = []
    for name in ("startup_before.json", "startup.json"):
        path, r = load(name)
        for kind in ("fresh", "restart"):
            first = (r.get(kind) or {}).get("first") or {}
            rows.append(f"| {name.removesuffix('.json')}: {'fresh clone' if kind == 'fresh' else 'restart'} | "
                        f"`{r.get('commit', '?')}` | {secs(first.get('title_s'))} | {secs(first.get('button_s'))} | "
                        f"{secs(first.get('click_s'))} | {secs(first.get('answer_s'))} | {secs(first.get('after_click_s'))} |")
        notes.append(source(path, r))
    return ("Seconds from `streamlit run app.py` (`python bench/startup.py`):\n\n" + "\n".join(rows) + "\n\n"
            + "\n".join(f"- {n}" for n in notes) + "\n")


def defaults() -> str:
    path = RESULTS / "generic_defaults.txt"
    text = path.read_text().strip()
    if "=== summary" in text:  # the run's settings, the summary, and each subset's first-seed circuit
        lines = text.splitlines()
        start = next(i for i, x in enumerate(lines) if x.startswith("=== "))
        summary = next(i for i, x in enumerate(lines) if x.startswith("=== summary"))
        keep, seen, first = [], set(), False
        for x in lines[start:summary]:
            if x.startswith("=== "):
                subset = x[4:].split(",")[0]
                first = subset not in seen
                seen.add(subset)
                if first:
                    keep += ["", x]
            elif first and x.startswith(("circuit:", "stability:", "nearest stable", "adopted:", "expected encrypted",
                                         "agreement:", "mode ",
                                         "simulate ", "fhe ")):
                keep.append(x)
        text = "\n".join(lines[:start] + [""] + lines[summary:] + ["", "each subset's first seed:"] + keep)
    return ("```text\n" + text + "\n```\n\n" + source(path)
            + " Made by `bash bench/generic_defaults.sh`; the whole output is in the file.\n")


def quick_search() -> str:
    paths = sorted(RESULTS.glob("quick_search_*.txt"))
    if not paths:
        return "*No quick search measured yet: `bash bench/quick_search.sh DATASET` writes one.*\n"
    return "\n".join("```text\n" + p.read_text().strip() + "\n```\n\n" + source(p) + " Made by `bash bench/quick_search.sh`.\n"
                     for p in paths)


def levers() -> str:
    path, r = load("subset_levers.json")
    subsets = list(dict.fromkeys(x["subset"] for x in r["rows"]))
    variants = list(dict.fromkeys(x["variant"] for x in r["rows"]))
    cell = {(x["subset"], x["variant"]): x for x in r["rows"]}
    rows = ["Validation accuracy of the quantized model, mean of seeds 0, 1, 2 unless the cell says (spread: best - "
            "worst), one recipe with a few changes, one run per seed, and each run's widest accumulator where it was "
            "recorded (`bench/subset_levers.py`; `retinamnist`, `bloodmnist` and `chestmnist` are the generated ordinal, "
            "RGB and multi-label files; `gradual10-levels7-e80-i2k16` is today's generic recipe but for its best-of-3 "
            "rule):", "",
            "| variant | changes (to issue 20's generic recipe; search: to the dataset's searched recipe) | " + " | ".join(subsets) + " |",
            "|---|---|" + "---|" * len(subsets)]
    for v in variants:
        changes = next(x["changes"] for x in r["rows"] if x["variant"] == v)
        flat = ", ".join(f"{k}={val}" for part in changes.values() for k, val in part.items()) or "none"
        cells = [flat]
        for d in subsets:
            x = cell.get((d, v))
            if x is None:
                cells.append("-")
                continue
            notes = [f"spread {100 * x['spread']:.1f}"]
            if x["seeds"] != [0, 1, 2]:
                notes.append("seeds " + ", ".join(map(str, x["seeds"])))
            widths = [run.get("accumulator_bits") for run in x["runs"]]
            if all(widths):
                notes.append(", ".join(map(str, widths)) + " bits")
            cells.append(f"{pct(x['mean'])} ({'; '.join(notes)})")
        rows.append(f"| {v} | " + " | ".join(cells) + " |")
    return "\n".join(rows) + "\n\n" + source(path, r) + "\n"


def breast_bound() -> str:
    path, r = load("breast_cnn_bound.json")
    rows = ["| model | lookups | widest integer | validation (chosen of 3 seeds) | test, quantized | test AUC | "
            "test, simulated | encrypted median / image |", "|---|---|---|---|---|---|---|---|"]
    for x in r["rows"]:
        if "pbs_count" not in x:  # the clear teacher
            rows.append(f"| {x['model']} | - | - | {pct(x['val_accuracy'])} | {pct(x['test_float']['accuracy'])} (float) "
                        f"| {x['test_float']['auc']:.3f} | - | - |")
            continue
        rows.append(f"| {x['model']} | {x['pbs_count']} | {x['max_bit_width']} bits | {pct(x['val_accuracy'])} | "
                    f"{pct(x['test_quantized']['accuracy'])} | {x['test_quantized']['auc']:.3f} | "
                    f"{pct(x['test_simulate']['accuracy'])} | {ms(x['fhe_median_ms'] / 1000)} ({x['fhe_images']} images) |")
    return "\n".join(rows) + "\n\n" + source(path, r) + " Made by `python bench/breast_cnn_bound.py`.\n"


def stage_cost() -> str:
    from bench.stage_cost import markdown as stage_markdown

    path, r = load("stage_cost.json")
    return (f"{r['n']} {r['dataset']} test images per model, one per encrypted call, the models taking turns image "
            "by image; medians (`bench/stage_cost.py`):\n\n" + stage_markdown(r["models"]) + "\n\n" + source(path, r) + "\n")


def real_confidence() -> str:
    from bench.real_confidence import markdown as confidence_markdown

    out = []
    for path in sorted((RESULTS / "real").glob("confidence_*.json")):
        r = json.loads(path.read_text())
        what = Path(r["images"]).name + (" (the part the model held out)" if r.get("held_out") else "")
        out += [f"`{r['model']}` on `{what}`, {r['mode']} mode:", "", confidence_markdown(r), "", source(path, r), ""]
    return "\n".join(out) or "*No confidence report yet: `python bench/real_confidence.py` writes one.*\n"


TABLES = {
    "benchmark_pneumoniamnist": lambda: benchmark("pneumoniamnist"),
    "benchmark_breastmnist": lambda: benchmark("breastmnist"),
    "real_images": real_images,
    "real_corrections": corrections,
    "real_framing": framing,
    "service_load": service_load,
    "scaleout": scaleout,
    "startup": startup,
    "defaults": defaults,
    "subset_levers": levers,
    "quick_search": quick_search,
    "breast_bound": breast_bound,
    "stage_cost": stage_cost,
    "real_confidence": real_confidence,
}


def render() -> dict[str, str]:
    return {name: "<!-- generated by bench/report.py from bench/results/: do not edit -->\n\n" + make()
            for name, make in TABLES.items()}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--check", action="store_true", help="exit 1 if docs/generated/ differs from what the results give")
    a = ap.parse_args()
    tables = render()
    if a.check:
        stale = [n for n, text in tables.items() if not (OUT / f"{n}.md").exists() or (OUT / f"{n}.md").read_text() != text]
        if stale:
            print(f"docs/generated/ is stale: {', '.join(stale)}; run python bench/report.py", file=sys.stderr)
            return 1
        print(f"docs/generated/: {len(tables)} tables current")
        return 0
    OUT.mkdir(parents=True, exist_ok=True)
    for n, text in tables.items():
        (OUT / f"{n}.md").write_text(text)
    print(f"wrote {len(tables)} tables to {OUT.relative_to(REPO)}/")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
