"""What a feature stage costs, client and server, models side by side in one run.

For each model it runs the same test images through real encryption (an in-process service, as
the dashboard's), one image per call, the models taking turns image by image so that a busy
machine slows them alike. It prints the medians of the client's feature stage, encryption,
the server's run and decryption, the end-to-end latency, the bytes sent and received per image,
the evaluation keys, and each model's latency as a multiple of the first model's.

    python bench/stage_cost.py --dataset pneumoniamnist --models fcnn-16-w2a2i3-pool3 fcnn-16-w2a2i3-grid10-real \\
        NEW_MODEL --n 30 --json bench/results/stage_cost.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np



def measure(dataset: str, names: list[str], n: int, data_dir: str = "", say=print) -> dict:
    from engine.config import DataConfig
    from engine.learn import registry
    from engine.learn.data import load_split
    from engine.study.infer import Predictor

    images = load_split(DataConfig(dataset, data_dir=data_dir), "test").images[:n]
    predictors = {name: Predictor(registry.load(dataset, name)) for name in names}
    rows = {name: {"feature_s": [], "latency_s": [], "encrypt_s": [], "server_s": [], "decrypt_s": []} for name in names}
    sizes = {}
    for name, p in predictors.items():  # compile or load, keygen and key upload before the clock
        say(f"preparing {name}")
        p.run(images[:1], "fhe")
    for i in range(n):
        for name, p in predictors.items():
            t0 = time.perf_counter()
            p.saved.features(images[i : i + 1])
            rows[name]["feature_s"].append(time.perf_counter() - t0)
            r = p.run(images[i : i + 1], "fhe")["fhe"]
            rows[name]["latency_s"].append(float(r.latency_s[0]))
            for k in ("encrypt_s", "server_s", "decrypt_s"):
                rows[name][k].append(float(r.stages[k][0]))
            sizes[name] = {**r.sizes, "sent_bytes": r.wire["sent_bytes"], "received_bytes": r.wire["received_bytes"]}
    out = {}
    first = None
    for name, p in predictors.items():
        med = {k: float(np.median(v)) for k, v in rows[name].items()}
        first = first or med["latency_s"]
        report = p.compiled.report
        out[name] = {"stage": p.saved.stage_text(), "inputs": p.saved.in_features, "max_bit_width": report.max_bit_width,
                     "pbs_count": report.pbs_count, "p_error": report.compile["p_error"], **{f"median_{k}": v for k, v in med.items()},
                     "latency_ratio": med["latency_s"] / first, "ciphertext_bytes": sizes[name]["ciphertext_bytes"],
                     "result_bytes": sizes[name]["result_bytes"], "eval_key_bytes": sizes[name]["eval_key_bytes"]}
    return out


def markdown(rows: dict) -> str:
    lines = ["| model | feature stage | inputs | bits, PBS, p_error | client: features + encryption (ms) | server (ms) | "
             "decrypt (ms) | latency (ms) | x first | request / response bytes | evaluation keys |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, r in rows.items():
        lines.append(f"| `{name}` | {r['stage'].rsplit(': ', 1)[0]} | {r['inputs']} | {r['max_bit_width']}, {r['pbs_count']}, "
                     f"{r['p_error']:g} | {1e3 * r['median_feature_s']:.1f} + {1e3 * r['median_encrypt_s']:.1f} | "
                     f"{1e3 * r['median_server_s']:.0f} | {1e3 * r['median_decrypt_s']:.1f} | {1e3 * r['median_latency_s']:.0f} | "
                     f"{r['latency_ratio']:.2f} | {r['ciphertext_bytes']:,} / {r['result_bytes']:,} | "
                     f"{r['eval_key_bytes'] / 2**20:.1f} MiB |")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dataset", default="pneumoniamnist")
    ap.add_argument("--models", nargs="+", required=True, help="model names; the first is the reference")
    ap.add_argument("--n", type=int, default=30, help="test images per model")
    ap.add_argument("--data-dir", default="")
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    rows = measure(a.dataset, a.models, a.n, a.data_dir)
    print(f"{a.n} {a.dataset} test images per model, one per encrypted call, models taking turns; medians")
    print(markdown(rows))
    if a.json:
        from engine.study.evaluate import machine_info

        Path(a.json).write_text(json.dumps({"dataset": a.dataset, "n": a.n, "date": time.strftime("%Y-%m-%d"),
                                            "machine": machine_info(), "models": rows}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
