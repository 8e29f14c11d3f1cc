"""Benchmark a saved model on a full test split: the four modes, latency, keys, throughput,
and the same model compiled with Concrete ML's defaults for comparison.

Writes ``bench/results/<dataset>.json`` and ``bench/results/<dataset>.md``.
"""

from __future__ import annotations

import multiprocessing as mp
import tempfile
import time
from pathlib import Path
from typing import Callable

import numpy as np

from ..learn.data import load_split
from .evaluate import latency_stats, machine_info, results_dir, summarize, write_json
from ..fhe.keys import FHEClient
from ..fhe.circuit import compile_model
from .infer import Predictor

BATCH_SIZE = 32  # images per call for the batch throughput (per image: 185 ms at 32, 190 at 16, 205 at 4)


def _defaults_worker(model_dir: str, n_images: int, queue) -> None:
    """In a child process: compile with Concrete ML's defaults (no rounding threshold, default
    p_error), generate keys, run a few encrypted images. Reports each phase as it ends."""
    import torch
    from concrete.ml.torch.compile import compile_brevitas_qat_model

    from ..fhe.simulate import thread_tag_stack
    from ..learn.registry import _read

    thread_tag_stack()
    saved = _read(Path(model_dir))
    t0 = time.perf_counter()
    qm = compile_brevitas_qat_model(saved.load_torch(), torch.from_numpy(saved.calibration_features(512)))
    queue.put(("compile_s", time.perf_counter() - t0))
    queue.put(("pbs_count", int(qm.fhe_circuit.statistics["programmable_bootstrap_count"])))
    queue.put(("max_bit_width", int(qm.fhe_circuit.graph.maximum_integer_bit_width())))
    t0 = time.perf_counter()
    qm.fhe_circuit.keygen()
    queue.put(("keygen_s", time.perf_counter() - t0))
    x = saved.calibration_features(n_images)
    lat = []
    for i in range(n_images):
        t0 = time.perf_counter()
        qm.forward(x[i : i + 1], fhe="execute")
        lat.append(time.perf_counter() - t0)
        queue.put(("latencies", list(lat)))
    queue.put(("done", True))


def measure_defaults(model_dir: Path, n_images: int = 3, cap_s: float = 600.0) -> dict:
    """Concrete ML defaults on the same model, within ``cap_s`` seconds of wall time."""
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_defaults_worker, args=(str(model_dir), n_images, queue), daemon=True)
    start = time.perf_counter()
    proc.start()
    out: dict = {"cap_s": cap_s, "finished": False}
    while time.perf_counter() - start < cap_s:
        try:
            key, value = queue.get(timeout=1.0)
        except Exception:  # queue.Empty
            if not proc.is_alive():
                break
            continue
        if key == "done":
            out["finished"] = True
            break
        out[key] = value
    out["wall_s"] = time.perf_counter() - start
    if proc.is_alive():
        proc.kill()
    proc.join(timeout=10)
    if out.get("latencies"):
        out["latency_median_s"] = float(np.median(out.pop("latencies")))
    return out


def _fresh_process_worker(model_dir: str, compile_settings: dict, cache_dir: str, image: np.ndarray,
                          spawned_at: float, queue) -> None:
    """In a fresh process: what a newly started client + service pay before the first answer.
    Reports each phase's seconds (wall clock, ``time.time``, to include the interpreter start)."""
    t = {"interpreter_s": time.time() - spawned_at}
    t0 = time.perf_counter()
    from ..config import CompileConfig
    from .infer import Predictor
    from ..learn.registry import _read

    t["import_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    p = Predictor(saved=_read(Path(model_dir)), compile_config=CompileConfig(**compile_settings),
                  cache_dir=Path(cache_dir) if cache_dir else None)
    p.ensure_compiled()
    t["load_circuit_s"] = time.perf_counter() - t0
    t["keygen_s"] = p.ensure_client().keygen()
    t0 = time.perf_counter()
    p.ensure_remote().register()
    t["register_keys_s"] = time.perf_counter() - t0
    x = p.features(image[None])
    for name in ("first_request_s", "second_request_s"):
        t0 = time.perf_counter()
        p.remote.predict(x)
        t[name] = time.perf_counter() - t0
    t["start_to_first_answer_s"] = time.time() - spawned_at - t["second_request_s"]
    queue.put(t)


def measure_fresh_process(predictor: Predictor, image: np.ndarray, timeout_s: float = 600.0) -> dict:
    """Start a fresh Python process that loads the cached circuit, generates keys, registers
    them with a fresh in-process service and classifies ``image`` twice; its phase timings."""
    import dataclasses

    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    cc = dataclasses.asdict(predictor.compile_config or predictor.saved.config.compile)
    proc = ctx.Process(target=_fresh_process_worker, daemon=True,
                       args=(str(predictor.saved.path), cc, str(predictor.cache_dir or ""), image, time.time(), queue))
    proc.start()
    try:
        return queue.get(timeout=timeout_s)
    finally:
        proc.join(timeout=30)
        if proc.is_alive():
            proc.kill()


def run_bench(predictor: Predictor, data_cfg, limit: int = 0, throughput_images: int = 128,
              backend: str = "local", scheduler: str | None = None, batch_size: int = BATCH_SIZE,
              defaults_cap_s: float = 600.0,
              defaults_images: int = 3, say: Callable[[str], None] = lambda m: None,
              progress=None, repeats: int = 3) -> dict:
    saved = predictor.saved
    split = load_split(data_cfg, "test").head(limit)

    say("cold compile (fresh cache folder)")
    with tempfile.TemporaryDirectory() as tmp:
        cold = compile_model(saved, predictor.compile_config, Path(tmp)).report
    predictor.ensure_compiled()
    say("key generation (fresh client)")
    predictor.client = FHEClient(predictor.compiled)
    keygen_s = predictor.client.keygen()

    say(f"four modes on {len(split)} test images")
    results = predictor.run(split.images, "all", progress)
    report = summarize(predictor, split, results)
    fhe = results["fhe"]
    report["circuit"]["compile_s"] = cold.compile_s
    report["circuit"]["from_cache"] = False
    report["circuit"]["keygen_s"] = keygen_s
    e2e, server = latency_stats(fhe.latency_s), latency_stats(fhe.stages["server_s"])
    report.update(
        fhe_e2e_latency_median_s=e2e["latency_median_s"], fhe_e2e_latency_p90_s=e2e["latency_p90_s"],
        fhe_server_latency_median_s=server["latency_median_s"], fhe_server_latency_p90_s=server["latency_p90_s"],
        ciphertext_bytes=fhe.sizes["ciphertext_bytes"], result_bytes=fhe.sizes["result_bytes"],
        eval_key_bytes=fhe.sizes["eval_key_bytes"],
    )

    say("first requests: a fresh key, a fresh process")
    lat = np.asarray(fhe.latency_s)
    report["first_request"] = {
        "fresh_key_s": float(lat[0]),  # the first image of the run: keys generated and registered just before
        "later_median_s": float(np.median(lat[1:])) if len(lat) > 1 else None,
        "fresh_process": measure_fresh_process(predictor, split.images[0]),
    }

    n_tp = min(throughput_images or len(split), len(split))
    say(f"throughput: {n_tp} images spread over workers ({backend})")
    tp_result, batch = predictor.run_distributed(split.images[:n_tp], backend, scheduler)
    report["throughput_img_per_s"] = n_tp / batch.wall_s
    report["throughput"] = {"backend": backend, "workers": batch.n_workers, "images": n_tp, "wall_s": batch.wall_s,
                            "server_wall_s": batch.server_wall_s,
                            "agrees_with_sequential": bool(np.array_equal(tp_result.predictions, fhe.predictions[:n_tp]))}
    if batch_size > 1:
        report["batch_throughput"] = measure_batches(predictor, split.images[:n_tp], fhe.predictions[:n_tp], batch_size,
                                                     backend, scheduler, say, repeats)

    say(f"Concrete ML defaults on the same model (capped at {defaults_cap_s:.0f} s)")
    d = measure_defaults(saved.path, defaults_images, defaults_cap_s)
    ours_lat = e2e["latency_median_s"]
    if d.get("latency_median_s"):
        report["defaults_latency_ratio"] = d["latency_median_s"] / ours_lat
        report["defaults_latency_ratio_is_lower_bound"] = False
    else:  # did not finish: the cap (minus what was spent before) bounds it from below
        spent = d["wall_s"] - d.get("compile_s", 0) - d.get("keygen_s", 0)
        report["defaults_latency_ratio"] = max(spent, 0) / ours_lat if "keygen_s" in d else d["wall_s"] / ours_lat
        report["defaults_latency_ratio_is_lower_bound"] = True
    if d.get("keygen_s"):
        report["defaults_keygen_ratio"] = d["keygen_s"] / keygen_s
        report["defaults_keygen_ratio_is_lower_bound"] = False
    else:
        report["defaults_keygen_ratio"] = (d["wall_s"] - d.get("compile_s", 0)) / keygen_s
        report["defaults_keygen_ratio_is_lower_bound"] = True
    report["defaults"] = d
    report["machine"] = machine_info()
    report["targets"] = [{"target": t, "measured": v, "met": ok} for t, v, ok in targets(report)]
    return report


def measure_batches(predictor: Predictor, images: np.ndarray, sequential: np.ndarray, batch_size: int,
                    backend: str, scheduler: str | None, say: Callable[[str], None], repeats: int = 3) -> dict:
    """Steady-state throughput, one image per call against ``batch_size`` images per call.

    Every run starts with every worker warm (circuit loaded, keys prepared), so the runs compare
    the calls themselves; the round-1 figure (``throughput_img_per_s``) counts the workers' start
    too. Encryption and decryption run on the same machine and count in the wall time. The two
    kinds of run alternate ``repeats`` times (this machine's speed drifts by 10-15% between runs)
    and the medians are reported, with every run's figure."""
    from ..fhe.circuit import BatchedCircuitError

    out = {"images_per_call": batch_size, "backend": backend, "images": len(images), "repeats": repeats}
    kinds = (("single", 1), ("batched", batch_size))
    try:  # the batched circuit is compiled (and checked) first: one that is refused is reported, not timed
        predictor.run_distributed(images[:batch_size], backend, scheduler, batch_size=batch_size, warm=True)
    except BatchedCircuitError as exc:
        say(f"batched circuit refused: {exc}")
        out["refused"], kinds = str(exc), kinds[:1]
    runs: dict[str, list] = {tag: [] for tag, _n in kinds}
    for rep in range(repeats):
        for tag, per_call in kinds:
            say(f"steady-state throughput {rep + 1}/{repeats}: {len(images)} images, {per_call} per call ({backend})")
            res, b = predictor.run_distributed(images, backend, scheduler, batch_size=per_call, warm=True)
            runs[tag].append({"img_per_s": len(images) / b.wall_s, "wall_s": b.wall_s, "encrypt_s": float(b.encrypt_s.sum()),
                              "agrees_with_sequential": float(np.mean(res.predictions == sequential))})
            out["workers"] = b.n_workers
    for tag, rs in runs.items():
        out[f"{tag}_runs_img_per_s"] = [r["img_per_s"] for r in rs]
        mid = sorted(rs, key=lambda r: r["img_per_s"])[len(rs) // 2]
        out[f"{tag}_img_per_s"] = mid["img_per_s"]
        out[f"{tag}_wall_s"], out[f"{tag}_encrypt_s"] = mid["wall_s"], mid["encrypt_s"]
        out[f"{tag}_agrees_with_sequential"] = min(r["agrees_with_sequential"] for r in rs)
    if "batched_img_per_s" in out:
        out["gain_over_single"] = out["batched_img_per_s"] / out["single_img_per_s"]
    return out


def _batch_rows(r: dict) -> list[str]:
    b = r.get("batch_throughput")
    if not b:
        return []
    runs = lambda tag: ", ".join(f"{v:.2f}" for v in b[f"{tag}_runs_img_per_s"])  # noqa: E731
    if b.get("refused"):
        return [f"| steady state ({b['workers']} warm {b['backend']} workers, {b['images']} images, median of "
                f"{b['repeats']}): 1 image per call | {b['single_img_per_s']:.2f} img/s (runs: {runs('single')}) |",
                f"| steady state: {b['images_per_call']} images per call | refused: {b['refused']} |"]
    return [
        f"| steady state ({b['workers']} warm {b['backend']} workers, {b['images']} images, median of {b['repeats']}): "
        f"1 image per call | {b['single_img_per_s']:.2f} img/s (runs: {runs('single')}) |",
        f"| steady state: {b['images_per_call']} images per call (one request each) | {b['batched_img_per_s']:.2f} img/s "
        f"(runs: {runs('batched')}; {b['gain_over_single']:.2f}x one per call; "
        f"{100 * b['batched_agrees_with_sequential']:.1f}% same predictions as one by one) |",
    ]


def _first_request_rows(r: dict, ms) -> list[str]:
    f = r.get("first_request")
    if not f:
        return []
    fp = f["fresh_process"]
    return [
        f"| first request of a fresh key / later median | {ms(f['fresh_key_s'])} / {ms(f['later_median_s'])} |",
        f"| fresh process: first / second request | {ms(fp['first_request_s'])} / {ms(fp['second_request_s'])} |",
        f"| fresh process: start to first answer (imports, circuit, keygen, key upload) | "
        f"{fp['start_to_first_answer_s']:.2f} s ({fp['interpreter_s'] + fp['import_s']:.2f} s, "
        f"{fp['load_circuit_s']:.2f} s, {fp['keygen_s']:.2f} s, {fp['register_keys_s']:.2f} s) |",
    ]


# The performance issues' targets: encrypted accuracy, AUC and latency per dataset (the rest for
# every model). Round 2 asks for 99.5% agreement and 1.5x the round-1 batch throughput, measured
# by this benchmark on the round-1 models (``bench/results/<dataset>_round1-*.json``).
ACCURACY_TARGETS = {"pneumoniamnist": 0.88, "breastmnist": 0.85}
AUC_TARGETS = {"breastmnist": 0.88}
LATENCY_TARGETS_S = {"breastmnist": 0.200}
MAX_LATENCY_S = 0.150
ROUND1_THROUGHPUT = {"pneumoniamnist": 3.53, "breastmnist": 3.22}
THROUGHPUT_GAIN = 1.5
MAX_FLOAT_GAP = 0.01
MIN_AGREEMENT = 0.995
MAX_KEYGEN_S = 10.0
MAX_COMPILE_S = 30.0


def targets(r: dict) -> list[tuple[str, str, bool]]:
    """(target, measured, met) for each target that applies to this report."""
    fhe, flt, c = r["modes"]["fhe"], r["modes"]["float"], r["circuit"]
    ds = r["dataset"]
    rows = []
    goal = ACCURACY_TARGETS.get(ds)
    if goal is not None:
        rows.append((f"encrypted accuracy >= {100 * goal:.0f}%", f"{100 * fhe['accuracy']:.1f}%", fhe["accuracy"] >= goal))
    auc_goal = AUC_TARGETS.get(ds)
    if auc_goal is not None and fhe.get("auc") is not None:
        rows.append((f"encrypted AUC >= {auc_goal:.2f}", f"{fhe['auc']:.3f}", fhe["auc"] >= auc_goal))
    gap = flt["accuracy"] - fhe["accuracy"]
    max_lat = LATENCY_TARGETS_S.get(ds, MAX_LATENCY_S)
    rows += [
        (f"encrypted at most {100 * MAX_FLOAT_GAP:.0f} point below float", f"{100 * -gap:+.1f} points",
         gap <= MAX_FLOAT_GAP + 1e-9),
        (f"simulate/encrypted agreement >= {100 * MIN_AGREEMENT:.1f}%", f"{100 * r['agreement_simulate_fhe']:.1f}%",
         r["agreement_simulate_fhe"] >= MIN_AGREEMENT),
        (f"median end-to-end latency <= {1000 * max_lat:.0f} ms", f"{1000 * r['fhe_e2e_latency_median_s']:.1f} ms",
         r["fhe_e2e_latency_median_s"] <= max_lat),
    ]
    base = ROUND1_THROUGHPUT.get(ds)
    if base and r.get("throughput_img_per_s"):
        # The batch figure when there is one: "a batch sent as one request".
        b = r.get("batch_throughput") or {}
        tp = b.get("batched_img_per_s") or b.get("single_img_per_s") or r["throughput_img_per_s"]
        rows.append((f"throughput >= {THROUGHPUT_GAIN:g}x round 1 ({base:.2f} img/s)", f"{tp:.2f} img/s ({tp / base:.2f}x)",
                     tp >= THROUGHPUT_GAIN * base))
    rows += [
        (f"key generation <= {MAX_KEYGEN_S:.0f} s", f"{c['keygen_s']:.2f} s", c["keygen_s"] <= MAX_KEYGEN_S),
        (f"cold compile <= {MAX_COMPILE_S:.0f} s", f"{c['compile_s']:.2f} s", c["compile_s"] <= MAX_COMPILE_S),
    ]
    return rows


def variant_name(cc) -> str:
    """File-name tag for a benchmark run with compile settings other than the model's own."""
    return f"r{cc.rounding_threshold_bits}-{cc.rounding_method}-p{cc.p_error:g}"


def write(report: dict, folder: Path | None = None, variant: str | None = None) -> tuple[Path, Path]:
    """``<dataset>.json/.md``, or ``<dataset>_<variant>.json/.md`` for other compile settings."""
    folder = Path(folder or results_dir())
    folder.mkdir(parents=True, exist_ok=True)
    stem = f"{report['dataset']}_{variant}" if variant else report["dataset"]
    jpath, mpath = folder / f"{stem}.json", folder / f"{stem}.md"
    write_json(report, jpath)
    mpath.write_text(markdown(report))
    return jpath, mpath


def markdown(r: dict) -> str:
    m, c = r["modes"], r["circuit"]
    pct = lambda v: "-" if v is None else f"{100 * v:.1f}%"  # noqa: E731
    ms = lambda v: "-" if v is None else f"{1000 * v:.1f} ms"  # noqa: E731
    lines = [
        f"### {r['dataset']} — model `{r['model']}` — {r['n']} test images",
        "",
        f"Compiled with rounding to {c['compile']['rounding_threshold_bits']} bits ({c['compile']['rounding_method']}), "
        f"p_error {c['compile']['p_error']:g}.",
        "",
        f"Machine: {r['machine']['cpu']}, {r['machine']['cores']} cores.",
        "",
        "| mode | accuracy | balanced accuracy | AUC | median latency / image | p90 |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for mode in ("float", "quantized", "simulate", "fhe"):
        x = m[mode]
        auc = "-" if x["auc"] is None else f"{x['auc']:.3f}"
        lines.append(f"| {mode} | {pct(x['accuracy'])} | {pct(x.get('balanced_accuracy'))} | {auc} | "
                     f"{ms(x['latency_median_s'])} | {ms(x['latency_p90_s'])} |")
    lb = lambda k: " (lower bound)" if r.get(f"{k}_is_lower_bound") else ""  # noqa: E731
    lines += [
        "",
        "| figure | value |",
        "| --- | --- |",
        f"| encrypted end to end, median / p90 | {ms(r['fhe_e2e_latency_median_s'])} / {ms(r['fhe_e2e_latency_p90_s'])} |",
        f"| server run alone, median / p90 | {ms(r['fhe_server_latency_median_s'])} / {ms(r['fhe_server_latency_p90_s'])} |",
        f"| encrypt / decrypt (median) | {ms(m['fhe'].get('encrypt_median_s'))} / {ms(m['fhe'].get('decrypt_median_s'))} |",
        f"| simulate vs encrypted agreement | {pct(r.get('agreement_simulate_fhe'))} |",
        f"| key generation | {c['keygen_s']:.2f} s |",
        f"| cold compile | {c['compile_s']:.2f} s |",
        f"| evaluation keys / ciphertext in / result out | {r['eval_key_bytes'] / 2**20:.1f} MiB / {r['ciphertext_bytes'] / 1024:.1f} KiB / {r['result_bytes'] / 1024:.1f} KiB |",
        f"| max bit-width / programmable bootstraps | {c['max_bit_width']} / {c['pbs_count']} |",
        *_first_request_rows(r, ms),
        f"| throughput ({r['throughput']['workers']} {r['throughput']['backend']} workers, {r['throughput']['images']} images, 1 per call, workers' start included) | {r['throughput_img_per_s']:.2f} img/s |",
        *_batch_rows(r),
        f"| Concrete ML defaults vs ours: latency | {r['defaults_latency_ratio']:.1f}x{lb('defaults_latency_ratio')} |",
        f"| Concrete ML defaults vs ours: key generation | {r['defaults_keygen_ratio']:.1f}x{lb('defaults_keygen_ratio')} |",
        "",
        "| target | measured | met |",
        "| --- | --- | --- |",
    ]
    lines += [f"| {t['target']} | {t['measured']} | {'yes' if t['met'] else '**no**'} |" for t in r["targets"]]
    return "\n".join(lines) + "\n"
