"""Measurement: evaluate (a split or your own labelled images), bench, search, sweep."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from ..config import CompileConfig, ModelConfig, PipelineConfig, TrainConfig
from .args import (UserError, compile_args, data_args, data_cfg, model_args, modes_arg, predictor, progress_bar, say, server_arg)


def add_evaluate(sub) -> None:
    p = sub.add_parser("evaluate", help="accuracy, AUC, agreement and latency per mode on a split or on your own labelled images")
    data_args(p)
    model_args(p)
    compile_args(p)
    p.add_argument("--split", default="test", choices=["train", "val", "test"])
    p.add_argument("--limit", type=int, default=0, help="only the first N images (0: all)")
    p.add_argument("--images", default=None,
                   help="a folder or .zip with one subfolder per class (named after the label or its index): "
                        "validate on your own labelled images through the upload path instead of a split")
    p.add_argument("--label-map", default=None,
                   help="with --images: folder names to label indices, e.g. NORMAL=0,PNEUMONIA=1")
    point = p.add_argument_group("operating point (with --images, binary datasets: the threshold answers are decided with)")
    point.add_argument("--target-recall", type=float, default=None,
                       help="choose the threshold whose recall of the finding (pneumonia; malignant) reaches this, e.g. 0.95")
    point.add_argument("--target-specificity", type=float, default=None,
                       help="choose the threshold whose specificity reaches this, e.g. 0.9")
    point.add_argument("--refer-band", default=None, metavar="LOW,HIGH",
                       help="answer 'refer to a radiologist' when the finding's probability is in [LOW, HIGH)")
    point.add_argument("--save-point", default=None, metavar="FILE", help="write the chosen point to this JSON file")
    point.add_argument("--point", default=None, metavar="FILE",
                       help="decide with this saved point and report the figures at it (made for this model only)")
    modes_arg(p, "float,quantized,simulate")
    server_arg(p)
    p.add_argument("--json", default=None, help="write the report to this file")

    p.add_argument("--backend", choices=["local", "dask"], default=None,
                   help="run the fhe mode as one batch over processes (local) or a Dask cluster")
    p.add_argument("--scheduler", default=None, help="dask scheduler address, e.g. tcp://10.0.0.5:8786")
    p.add_argument("--batch-size", type=int, default=1,
                   help="with --backend: images per encrypted call (a circuit compiled for it, same keys)")


def cmd_evaluate(a) -> int:
    from ..learn.data import load_split
    from ..study.evaluate import evaluate, table, write_json

    if a.images:
        return _validate_images(a)
    if a.point or a.save_point or a.target_recall is not None or a.target_specificity is not None or a.refer_band:
        raise UserError("operating points go with --images: they are chosen and audited on your own labelled images")
    if a.label_map:
        raise UserError("--label-map goes with --images")
    p = predictor(a)
    split = load_split(data_cfg(a), a.split).head(a.limit)
    bar, update = progress_bar("evaluating")
    if a.batch_size > 1 and not a.backend:
        raise UserError("--batch-size needs --backend local or dask")
    report = evaluate(p, split, a.modes, progress=update, backend=a.backend, scheduler=a.scheduler,
                      batch_size=a.batch_size)
    bar.close()
    print(table(report))
    if "distributed" in report:
        d = report["distributed"]
        print(f"encrypted batch: {d['throughput_img_per_s']:.2f} img/s over {d['workers']} {d['backend']} workers, "
              f"{d['images_per_call']} image(s) per call")
    if a.json:
        write_json(report, Path(a.json))
        print(f"wrote {a.json}")
    return 0


def add_bench(sub) -> None:
    p = sub.add_parser("bench", help="full-test-split benchmark of the four modes; writes bench/results/")
    data_args(p)
    model_args(p)
    compile_args(p)
    p.add_argument("--limit", type=int, default=0, help="only the first N test images (0: the full split)")
    p.add_argument("--throughput-images", type=int, default=128, help="images in the parallel throughput run")
    p.add_argument("--batch-size", type=int, default=None,
                   help="images per call for the batch throughput (default: 32; 1 skips it)")
    p.add_argument("--backend", choices=["local", "dask"], default="local")
    p.add_argument("--scheduler", default=None)
    p.add_argument("--defaults-cap", type=float, default=600.0, help="seconds allowed for the Concrete ML defaults run")
    p.add_argument("--defaults-images", type=int, default=3)
    p.add_argument("--repeats", type=int, default=3,
                   help="alternations of the steady-state throughput runs (the median is reported)")
    p.add_argument("--out", default=None, help="results folder (default: bench/results)")


def cmd_bench(a) -> int:
    from ..study import bench

    p = predictor(a)
    bar, update = progress_bar("benchmark")
    batch = bench.BATCH_SIZE if a.batch_size is None else a.batch_size
    report = bench.run_bench(p, data_cfg(a), a.limit, a.throughput_images, a.backend, a.scheduler, batch,
                             a.defaults_cap, a.defaults_images, say=say, progress=update, repeats=a.repeats)
    bar.close()
    variant = None if p.compile_config == p.saved.config.compile else bench.variant_name(p.compile_config)
    jpath, mpath = bench.write(report, Path(a.out) if a.out else None, variant)
    print(bench.markdown(report))
    print(f"wrote {jpath} and {mpath}")
    return 0


def add_search(sub) -> None:
    p = sub.add_parser("search", help="design-space search: validation accuracy vs encrypted latency, Pareto plot")
    data_args(p)
    p.add_argument("--hidden", nargs="+", default=["8", "16"], help="architectures, e.g. 8 16 32,16")
    p.add_argument("--bits", type=int, nargs="+", default=[2, 3], help="bit-widths for weights, activations and inputs alike")
    p.add_argument("--weight-bits", type=int, nargs="+", default=None, help="weight bit-widths (default: --bits)")
    p.add_argument("--act-bits", type=int, nargs="+", default=None, help="activation bit-widths (default: --bits)")
    p.add_argument("--input-bits", type=int, nargs="+", default=None, help="input bit-widths (default: --bits)")
    p.add_argument("--pools", type=int, nargs="+", default=[1, 2], help="client-side input pooling factors")
    p.add_argument("--prune", type=int, nargs="+", default=[0], help="max active inputs per neuron (0: off)")
    p.add_argument("--rounding", type=int, nargs="+", default=[4, 5])
    p.add_argument("--p-error", type=float, nargs="+", default=[0.1])
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--augment", type=int, default=2, help="random shift augmentation (pixels)")
    p.add_argument("--rotate", type=float, default=0.0, help="random rotation augmentation (degrees)")
    p.add_argument("--scale", type=float, default=0.0, help="random zoom augmentation (fraction)")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--distill", type=float, nargs="+", default=[0.0],
                   help="weights of the CNN teacher's soft labels (0: no teacher)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--n-fhe", type=int, default=3, help="validation images timed with real encryption per point")
    p.add_argument("--target-ms", type=float, default=150.0, help="latency target for choosing a point")
    p.add_argument("--min-agreement", type=float, default=0.995,
                   help="repeated simulations of the validation images must agree on this share (the 99%% target "
                        "plus a margin for the estimate's own noise)")
    p.add_argument("--merge", action="store_true",
                   help="keep the points of the earlier search in the results folder (the choice is made over all)")
    p.add_argument("--out", default=None, help="results folder (default: bench/results)")
    p.add_argument("--adopt", action="store_true",
                   help="ship the chosen point as the dataset's recipe (engine/learn/searched/<dataset>.json), "
                        "which `train` then starts from")


def cmd_search(a) -> int:
    import itertools

    from ..learn.data import dataset_info, locate
    from ..study.evaluate import results_dir, write_json
    from ..study.sweep import (add_shifted, choose, merge_points, pareto_figure, pareto_front, point_label, run_grid, score)

    dataset_info(a.dataset)
    data = data_cfg(a)
    locate(data)
    configs = []
    if a.weight_bits or a.act_bits or a.input_bits:
        bit_triples = list(itertools.product(a.weight_bits or a.bits, a.act_bits or a.bits, a.input_bits or a.bits))
    else:
        bit_triples = [(b, b, b) for b in a.bits]
    for hidden, (wb, ab, ib), pool, prune, distill, rb, pe in itertools.product(
            a.hidden, bit_triples, a.pools, a.prune, a.distill, a.rounding, a.p_error):
        h = tuple(int(x) for x in hidden.split(",") if x)
        train_cfg = TrainConfig(epochs=a.epochs, lr=a.lr, seed=a.seed, augment_shift=a.augment,
                                augment_rotate=a.rotate, augment_scale=a.scale, distill=distill)
        configs.append(PipelineConfig(
            data=data, model=ModelConfig(h, wb, ab, ib, prune, pool), train=train_cfg,
            compile=CompileConfig(rounding_threshold_bits=rb, p_error=pe)))
    bar, update = progress_bar("search")
    rows = run_grid(configs, 0, a.n_fhe, None, update)
    bar.close()
    out = Path(a.out) if a.out else results_dir()
    out.mkdir(parents=True, exist_ok=True)
    if a.merge and (out / f"{data.dataset}_search.json").exists():
        # Earlier searches' points stay on the front and in the choice.
        n = len(rows)
        rows = merge_points(json.loads((out / f"{data.dataset}_search.json").read_text())["points"], rows)
        say(f"merged with {len(rows) - n} points of earlier searches")

    bar, update = progress_bar("framing shift")
    add_shifted(rows, None, update)
    bar.close()
    target = a.target_ms / 1000
    best = choose(rows, target, a.min_agreement)
    front = pareto_front(rows, min_agreement=a.min_agreement)
    write_json({"dataset": data.dataset, "target_s": target, "min_agreement": a.min_agreement, "points": rows, "pareto": [point_label(r) for r in front],
                "chosen": best}, out / f"{data.dataset}_search.json")
    fig = pareto_figure(rows, f"{data.dataset}: validation score vs encrypted latency", target, best, a.min_agreement)
    fig.write_html(out / f"{data.dataset}_pareto.html", include_plotlyjs="cdn")
    try:
        fig.write_image(out / f"{data.dataset}_pareto.png", scale=1)
    except Exception as exc:  # noqa: BLE001 - the HTML is the primary artefact
        say(f"PNG export failed ({type(exc).__name__}: {exc}); the HTML plot was written")
    for r in sorted(rows, key=lambda r: r["fhe_latency_median_s"] or 0):
        mark = "*" if r in front else " "
        print(f"{mark} {point_label(r):<40} val sim {100 * r['simulate_accuracy']:.1f}% (score {100 * score(r):.1f}%, "
              f"shifted {100 * (r.get('shifted_balanced_accuracy') or 0):.1f}%, "
              f"agreement {100 * r.get('simulate_agreement', 1):.1f}%)  float {100 * r['float_accuracy']:.1f}%  "
              f"fhe {1000 * (r['fhe_latency_median_s'] or 0):.0f} ms  PBS {r['pbs_count']}  max bits {r['max_bit_width']}")
    m = best["config"]["model"]
    c = best["config"]["compile"]
    print(f"chosen (validation only): {point_label(best)}")
    print(f"train it: python -m engine train --dataset {data.dataset} --epochs {a.epochs} --augment {a.augment} "
          f"--rotate {a.rotate:g} --scale {a.scale:g} --lr {a.lr} "
          f"--hidden {' '.join(map(str, m['hidden']))} --weight-bits {m['weight_bits']} --act-bits {m['act_bits']} "
          f"--input-bits {m['input_bits']} --input-pool {m['input_pool']} --max-active-inputs {m['max_active_inputs']} "
          f"--distill {best['config']['train'].get('distill', 0):g} "
          f"--rounding-bits {c['rounding_threshold_bits']} --p-error {c['p_error']} --seed {a.seed}")
    print(f"wrote {out / (data.dataset + '_search.json')} and the Pareto plot ({data.dataset}_pareto.html/.png)")
    if a.adopt:
        from ..learn.recipes import adopt

        print(f"adopted as {data.dataset}'s recipe: {adopt({'dataset': data.dataset, 'chosen': best})}")
    return 0


def add_sweep(sub) -> None:
    p = sub.add_parser("sweep", help="bit-width sweep of a saved model's recipe; writes bench/results/<dataset>_sweep.json")
    data_args(p)
    model_args(p)
    p.add_argument("--bits", default="2-8", help="bit-widths for weights, activations and inputs alike, e.g. 2-8 or 2,4,8")
    p.add_argument("--rounding", type=int, nargs="+", default=[5, 6], help="rounding threshold bits (at least two settings)")
    p.add_argument("--epochs", type=int, default=None, help="epochs per point (default: the model's)")
    p.add_argument("--n-fhe", type=int, default=10, help="validation images run through real encryption per point")
    p.add_argument("--out", default=None, help="results folder (default: bench/results)")


def cmd_sweep(a) -> int:
    """Every point trains the saved model's recipe at one bit-width, compiles it at each rounding
    setting and measures it on validation (the test split is not touched)."""
    from ..learn import registry
    from ..study.evaluate import results_dir, write_json
    from ..study.sweep import sweep, sweep_table

    saved = registry.load(a.dataset, a.model, a.models_dir)
    base = saved.config.replace(data=data_cfg(a))
    if a.epochs:
        base = base.replace(train=dataclasses.replace(base.train, epochs=a.epochs))
    bits = _bit_list(a.bits)
    bar, update = progress_bar("sweep")
    rows = sweep(base, bits, sorted(set(a.rounding)), 0, a.n_fhe, Path(a.cache_dir) if a.cache_dir else None, update)
    bar.close()
    out = Path(a.out) if a.out else results_dir()
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{saved.dataset}_sweep.json"
    command = ("python -m engine sweep --dataset " + saved.dataset + f" --bits {a.bits} --rounding "
               + " ".join(map(str, sorted(set(a.rounding)))) + f" --n-fhe {a.n_fhe}" + (f" --epochs {a.epochs}" if a.epochs else ""))
    write_json({"dataset": saved.dataset, "model": saved.name, "recipe": saved.config.to_dict(), "command": command,
                "points": rows}, path)
    table = sweep_table(rows)
    md = path.with_suffix(".md")
    md.write_text(f"### Bit-width sweep — {saved.dataset}, recipe of `{saved.name}`\n\nValidation split only; "
                  f"encrypted accuracy on the first {a.n_fhe} validation images through real encryption. "
                  f"Reproduce: `{command}`.\n\n{table}\n")
    print(table)
    print(f"wrote {path} and {md.name}")
    return 0


def _validate_images(a) -> int:
    from ..learn import guard as guards
    from ..study import validate
    from ..study.evaluate import write_json

    if a.backend or a.batch_size > 1:
        raise UserError("--images runs the upload path one image at a time: drop --backend and --batch-size")
    p = predictor(a)
    say(f"{p.saved.dataset}/{p.saved.name}: feature stage {p.saved.stage_text()}")
    from ..learn.labelled import TRAIN_LIMIT

    files = validate.read_labelled(Path(a.images), p.info, validate.parse_label_map(a.label_map), limit=TRAIN_LIMIT)
    guard = guards.for_model(p.saved, data_cfg(a))
    if guard is None:
        say("no input check and no calibration: the model has no guard file and its dataset is not on this machine")
    point = _point_args(a, p.saved)
    bar, update = progress_bar("validating")
    report = validate.validate(p, guard, files, a.modes, progress=update, source=a.images, point=point)
    bar.close()
    print(validate.table(report))
    if a.target_recall is not None or a.target_specificity is not None:
        report["chosen_point"] = _choose_point(a, p, report, files, guard)
    if a.json:
        write_json(report, Path(a.json))
        print(f"wrote {a.json}")
    return 0


def _point_args(a, saved):
    """The saved point to decide with (checked against the model), after checking the other point options."""
    from ..study.operating import OperatingPoint

    targets = [t for t in (a.target_recall, a.target_specificity) if t is not None]
    if len(targets) > 1:
        raise UserError("give --target-recall or --target-specificity, not both")
    if a.save_point and not targets:
        raise UserError("--save-point needs --target-recall or --target-specificity")
    if a.refer_band and not targets:
        raise UserError("--refer-band goes with a target: it is saved with the point chosen")
    if a.point and targets:
        raise UserError("--point applies a saved point; a target chooses a new one: give one of them")
    return OperatingPoint.load(a.point).check(saved) if a.point else None


def _refer_band(text: str | None) -> list[float] | None:
    if not text:
        return None
    try:
        lo, hi = (float(v) for v in text.split(","))
    except ValueError:
        raise UserError(f"--refer-band takes LOW,HIGH probabilities, e.g. 0.3,0.6: {text!r}") from None
    return [lo, hi]


def _choose_point(a, p, report: dict, files, guard) -> dict:
    """The point meeting the target on these images: printed, and saved with --save-point."""
    import numpy as np

    from ..study.operating import make_point

    rows = report.get("images", [])
    if "operating" not in report or not rows:
        raise UserError(f"an operating point needs a binary dataset and readable images ({p.saved.dataset})")
    labels = np.asarray([r["label"] for r in rows])
    probs = np.asarray([r["finding_probability"] for r in rows])
    point = make_point(p.saved, p.info, labels, probs, [f for f in files if f.error is None], a.target_recall,
                       a.target_specificity, _refer_band(a.refer_band), calibrated=guard is not None, source=a.images)
    f = point.figures
    print(f"chosen: {point.describe()}; on these {point.images['n']} images sensitivity {100 * f['sensitivity']:.1f}% "
          f"(95% CI {100 * f['sensitivity_ci'][0]:.1f}-{100 * f['sensitivity_ci'][1]:.1f}), specificity "
          f"{100 * f['specificity']:.1f}% (95% CI {100 * f['specificity_ci'][0]:.1f}-{100 * f['specificity_ci'][1]:.1f})")
    if a.save_point:
        print(f"wrote {point.save(a.save_point)} (apply it with --point; predict takes it too)")
    return json.loads(point.to_json())


def _bit_list(text: str) -> list[int]:
    out = []
    for part in text.split(","):
        lo, _, hi = part.partition("-")
        out += list(range(int(lo), int(hi or lo) + 1))
    if not out or min(out) < 1 or max(out) > 16:
        raise UserError(f"bit-widths must be between 1 and 16: {text!r}")
    return sorted(set(out))


COMMANDS = {"evaluate": (add_evaluate, cmd_evaluate), "bench": (add_bench, cmd_bench), "search": (add_search, cmd_search), "sweep": (add_sweep, cmd_sweep)}
