"""Command line: ``python -m engine {train,compile,predict,evaluate,bench,search,serve,loadtest,models} ...``."""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

from .config import CompileConfig, DataConfig, ModelConfig, PipelineConfig, ServiceConfig, TrainConfig


class UserError(Exception):
    """Bad input from the user: reported in one line, exit code 2."""


def _data_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dataset", default="pneumoniamnist", help="MedMNIST 2D subset (default: pneumoniamnist)")
    p.add_argument("--data-dir", default="", help="folder with <dataset>.npz (default: $MEDMNIST_DIR, else ~/.medmnist)")
    p.add_argument("--size", type=int, default=28, help="image size: 28 (default) or 64/128/224 where the file exists")
    p.add_argument("--no-download", action="store_true", help="never try medmnist's download")
    p.add_argument("--models-dir", default=None, help="model registry (default: $ENGINE_MODELS_DIR, else ./models)")


def _model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, help="saved model name (default: the dataset's newest model)")
    p.add_argument("--cache-dir", default=None, help="circuit cache (default: $ENGINE_CACHE_DIR, else ./.cache)")


def _compile_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("compile (default: the settings saved with the model)")
    g.add_argument("--rounding-bits", type=int, default=None, help="rounding_threshold_bits (>= 2)")
    g.add_argument("--rounding-method", choices=["approximate", "exact"], default=None)
    g.add_argument("--p-error", type=float, default=None, help="error probability per PBS, e.g. 0.01")


def _modes_arg(p: argparse.ArgumentParser, default: str) -> None:
    p.add_argument("--modes", default=default, help="'all' or a comma list of float,quantized,simulate,fhe")


def _server_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--server", default=None,
                   help="run the fhe mode through this service (URL; several, comma separated, are replicas); "
                        "default: an in-process service")


def _byte_size(text: str) -> int:
    units = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "kib": 2**10, "mib": 2**20, "gib": 2**30}
    t = text.strip().lower().replace(" ", "")
    num = t.rstrip("kmgib")
    try:
        value = float(num) * units[t[len(num):]]
    except (ValueError, KeyError):
        raise argparse.ArgumentTypeError(f"not a size: '{text}' (use e.g. 1073741824, 1GiB, 512MiB)") from None
    if value <= 0:
        raise argparse.ArgumentTypeError("the size must be positive")
    return int(value)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m engine", description="Encrypted MedMNIST classification (Concrete ML).")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="train a QAT FCNN and save it to the registry")
    _data_args(p)
    p.add_argument("--name", default=None, help="model name (default: derived from the architecture and time)")
    g = p.add_argument_group("recipe (default: the search's choice for the dataset, else a generic recipe; "
                             "`python -m engine train --dataset X --show-recipe` prints it)")
    g.add_argument("--hidden", type=int, nargs="*", default=None, help="hidden widths, e.g. --hidden 32 16 (none: linear)")
    g.add_argument("--weight-bits", type=int, default=None)
    g.add_argument("--act-bits", type=int, default=None)
    g.add_argument("--input-bits", type=int, default=None)
    g.add_argument("--max-active-inputs", type=int, default=None, help="prune to this many inputs per neuron (0: off)")
    g.add_argument("--input-pool", type=int, default=None, help="average-pool the image by this factor on the client")
    g.add_argument("--augment", type=int, default=None, help="random shifts of up to N pixels during training")
    g.add_argument("--rotate", type=float, default=None, help="random rotations of up to N degrees during training")
    g.add_argument("--scale", type=float, default=None, help="random zoom by a factor in [1-S, 1+S] during training")
    g.add_argument("--stretch", type=float, default=None,
                   help="squeeze or stretch one axis by a factor in [1/(1+S), 1+S] during training (uploads squeezed to a square)")
    g.add_argument("--upload-augment", type=float, default=None,
                   help="share of training images given an upload's round trips each epoch (exposure, resize filters, blur, JPEG)")
    g.add_argument("--epochs", type=int, default=None)
    g.add_argument("--batch-size", type=int, default=None)
    g.add_argument("--lr", type=float, default=None)
    g.add_argument("--distill", type=float, default=None,
                   help="weight of a clear CNN teacher's soft labels in the loss, 0-1 (0: off; the teacher is cached)")
    g.add_argument("--teacher-epochs", type=int, default=None, help="epochs of the CNN teacher")
    g.add_argument("--rounding-noise", type=float, default=None,
                   help="noise-aware training: uniform noise of up to this many rounding steps on hidden pre-activations")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--limit-train", type=int, default=0, help="use only the first N training images")
    p.add_argument("--show-recipe", action="store_true", help="print the settings that would be used and exit")
    p.add_argument("--recipe", choices=["auto", "generic"], default="auto",
                   help="auto: the search's choice for the dataset where there is one; generic: the generic recipe")
    p.add_argument("--no-class-weighting", action="store_true")
    p.add_argument("--overwrite", action="store_true", help="replace a model of the same name")
    _compile_args(p)

    p = sub.add_parser("compile", help="compile a saved model to a TFHE circuit (cached)")
    p.add_argument("--stability-images", type=int, default=300,
                   help="validation images for the stability check (repeated simulations; 0: skip)")
    _data_args(p)
    _model_args(p)
    _compile_args(p)
    p.add_argument("--force", action="store_true", help="recompile even if cached")
    p.add_argument("--keygen", action="store_true", help="also generate keys and report their size and time")
    p.add_argument("--json", default=None, help="write the compile report to this file")

    p = sub.add_parser("predict", help="classify images in one or more modes")
    _data_args(p)
    _model_args(p)
    _compile_args(p)
    p.add_argument("--split", default="test", choices=["train", "val", "test"])
    p.add_argument("--index", type=int, nargs="+", default=[0], help="image indices in the split")
    p.add_argument("--image", nargs="+", default=None, help="image files (PNG, JPEG, BMP, TIFF, .npy) instead of --index")
    _modes_arg(p, "all")
    _server_arg(p)
    p.add_argument("--json", default=None)

    p = sub.add_parser("evaluate", help="accuracy, AUC, agreement and latency per mode on a split or on your own labelled images")
    _data_args(p)
    _model_args(p)
    _compile_args(p)
    p.add_argument("--split", default="test", choices=["train", "val", "test"])
    p.add_argument("--limit", type=int, default=0, help="only the first N images (0: all)")
    p.add_argument("--images", default=None,
                   help="a folder or .zip with one subfolder per class (named after the label or its index): "
                        "validate on your own labelled images through the upload path instead of a split")
    p.add_argument("--label-map", default=None,
                   help="with --images: folder names to label indices, e.g. NORMAL=0,PNEUMONIA=1")
    _modes_arg(p, "float,quantized,simulate")
    _server_arg(p)
    p.add_argument("--json", default=None, help="write the report to this file")

    p.add_argument("--backend", choices=["local", "dask"], default=None,
                   help="run the fhe mode as one batch over processes (local) or a Dask cluster")
    p.add_argument("--scheduler", default=None, help="dask scheduler address, e.g. tcp://10.0.0.5:8786")
    p.add_argument("--batch-size", type=int, default=1,
                   help="with --backend: images per encrypted call (a circuit compiled for it, same keys)")

    p = sub.add_parser("bench", help="full-test-split benchmark of the four modes; writes bench/results/")
    _data_args(p)
    _model_args(p)
    _compile_args(p)
    p.add_argument("--limit", type=int, default=0, help="only the first N test images (0: the full split)")
    p.add_argument("--throughput-images", type=int, default=128, help="images in the parallel throughput run")
    p.add_argument("--batch-size", type=int, default=None,
                   help="images per call for the batch throughput (default: 32; 1 skips it)")
    p.add_argument("--backend", choices=["local", "dask"], default="local")
    p.add_argument("--scheduler", default=None)
    p.add_argument("--defaults-cap", type=float, default=600.0, help="seconds allowed for the Concrete ML defaults run")
    p.add_argument("--defaults-images", type=int, default=3)
    p.add_argument("--out", default=None, help="results folder (default: bench/results)")

    p = sub.add_parser("search", help="design-space search: validation accuracy vs encrypted latency, Pareto plot")
    _data_args(p)
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

    p = sub.add_parser("sweep", help="bit-width sweep of a saved model's recipe; writes bench/results/<dataset>_sweep.json")
    _data_args(p)
    _model_args(p)
    p.add_argument("--bits", default="2-8", help="bit-widths for weights, activations and inputs alike, e.g. 2-8 or 2,4,8")
    p.add_argument("--rounding", type=int, nargs="+", default=[5, 6], help="rounding threshold bits (at least two settings)")
    p.add_argument("--epochs", type=int, default=None, help="epochs per point (default: the model's)")
    p.add_argument("--n-fhe", type=int, default=10, help="validation images run through real encryption per point")
    p.add_argument("--out", default=None, help="results folder (default: bench/results)")

    p = sub.add_parser("serve", help="run the encrypted-inference HTTP service for every saved model")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--models-dir", default=None, help="model registry (default: $ENGINE_MODELS_DIR, else ./models)")
    p.add_argument("--cache-dir", default=None, help="circuit cache (default: $ENGINE_CACHE_DIR, else ./.cache)")
    p.add_argument("--key-store-bytes", type=_byte_size, default=ServiceConfig.key_store_bytes,
                   help="memory bound of the registered key sets, e.g. 1GiB or 1073741824 (default 4GiB)")
    p.add_argument("--key-ttl", type=float, default=0.0, help="drop key sets idle this many seconds (0: never)")
    p.add_argument("--workers", type=int, default=0,
                   help="FHE runs in flight (default 0: one per core; a lone run spreads over every core, "
                        "runs side by side use one core each)")
    p.add_argument("--max-queue", type=int, default=64, help="runs waiting before the service answers 429")
    p.add_argument("--backend", choices=["local", "dask"], default="local")
    p.add_argument("--scheduler", default="", help="dask scheduler address for --backend dask")
    p.add_argument("--batch-size", type=int, default=1,
                   help="also serve each model for this many images per request (same keys; local backend)")

    p = sub.add_parser("loadtest", help="N concurrent clients with their own keys against a running service")
    p.add_argument("--server", required=True, help="service URL, e.g. http://127.0.0.1:8000")
    p.add_argument("--clients", type=int, default=4)
    p.add_argument("--requests", type=int, default=5, help="encrypted predictions per client")
    p.add_argument("--dataset", default="pneumoniamnist")
    p.add_argument("--model", default=None)
    p.add_argument("--json", default=None, help="write the figures to this file")

    p = sub.add_parser("models", help="list saved models")
    p.add_argument("--dataset", default=None)
    p.add_argument("--models-dir", default=None)
    return parser


def _data_cfg(a) -> DataConfig:
    return DataConfig(dataset=a.dataset.lower(), size=a.size, data_dir=a.data_dir, allow_download=not a.no_download)


def _compile_cfg(a, base: CompileConfig) -> CompileConfig:
    return CompileConfig(
        rounding_threshold_bits=a.rounding_bits if a.rounding_bits is not None else base.rounding_threshold_bits,
        rounding_method=a.rounding_method or base.rounding_method,
        p_error=a.p_error if a.p_error is not None else base.p_error,
        inputset_size=base.inputset_size,
    )


def _bar(desc: str):
    from tqdm import tqdm

    bar = tqdm(total=0, desc=desc, unit="img", file=sys.stderr, leave=False, mininterval=0.5, disable=None)

    def update(done: int, total: int, message: str) -> None:
        bar.total = total
        bar.n = done
        bar.set_postfix_str(message, refresh=False)
        bar.refresh()

    return bar, update


def _say(msg: str) -> None:
    print(f"[engine] {msg}", file=sys.stderr)


def cmd_train(a) -> int:
    from tqdm import tqdm

    from . import registry
    from .train import train

    from .data import dataset_info

    from .recipes import GENERIC, recipe

    dataset_info(a.dataset)
    base, source = recipe(a.dataset) if a.recipe == "auto" else (dict(GENERIC), "the generic recipe (--recipe generic)")
    bm, bt = base["model"], base["train"]

    def pick(value, default):
        return default if value is None else value

    cfg = PipelineConfig(
        data=_data_cfg(a),
        model=ModelConfig(tuple(pick(a.hidden, list(bm.hidden))), pick(a.weight_bits, bm.weight_bits),
                          pick(a.act_bits, bm.act_bits), pick(a.input_bits, bm.input_bits),
                          pick(a.max_active_inputs, bm.max_active_inputs), pick(a.input_pool, bm.input_pool)),
        train=TrainConfig(epochs=pick(a.epochs, bt.epochs), batch_size=pick(a.batch_size, bt.batch_size),
                          lr=pick(a.lr, bt.lr), seed=a.seed, class_weighting=not a.no_class_weighting,
                          limit_train=a.limit_train, augment_shift=pick(a.augment, bt.augment_shift),
                          augment_rotate=pick(a.rotate, bt.augment_rotate), augment_scale=pick(a.scale, bt.augment_scale),
                          augment_stretch=pick(a.stretch, bt.augment_stretch),
                          augment_upload=pick(a.upload_augment, bt.augment_upload),
                          distill=pick(a.distill, bt.distill), teacher_epochs=pick(a.teacher_epochs, bt.teacher_epochs),
                          rounding_noise=pick(a.rounding_noise, bt.rounding_noise)),
        compile=_compile_cfg(a, base["compile"]),
    )
    a.epochs = cfg.train.epochs
    _say(f"recipe: {source}; overridden by the flags given")
    if a.show_recipe:
        print(json.dumps(cfg.to_dict(), indent=2))
        return 0
    if a.epochs < 1:
        raise UserError("--epochs must be at least 1")
    from .data import locate

    locate(cfg.data)  # a missing file fails here, before the progress bar starts
    bar = tqdm(total=a.epochs, desc="training", unit="epoch", file=sys.stderr, disable=None)

    def on_epoch(r):
        bar.update(1)
        bar.set_postfix(loss=f"{r.train_loss:.3f}", val_acc=f"{r.val_accuracy:.3f}")

    result = train(cfg, progress=on_epoch)
    bar.close()
    saved = registry.save(result, a.name, a.models_dir, overwrite=a.overwrite)
    from . import guard as guards

    g = guards.fit_for(saved, cfg.data)
    m = result.metrics
    print(f"saved {saved.dataset}/{saved.name} (best epoch {m['best_epoch']}) to {saved.path}")
    print(f"val accuracy {m['val']['accuracy']:.4f}  test accuracy {m['test']['accuracy']:.4f}  test AUC {m['test']['auc'] or float('nan'):.4f}")
    print(f"input check fitted: {100 * g.val_pass_rate:.1f}% of validation images pass; confidence temperature {g.temperature:.3f}")
    return 0


def _predictor(a):
    from .data import dataset_info
    from .infer import Predictor, parse_modes

    dataset_info(a.dataset)  # unknown dataset: one clear error before anything loads
    if getattr(a, "modes", None):
        parse_modes(a.modes)

    p = Predictor.open(a.dataset.lower(), a.model, a.models_dir, cache_dir=a.cache_dir, progress_text=_say)
    p.compile_config = _compile_cfg(a, p.saved.config.compile)
    if getattr(a, "server", None):
        from .client import HTTPTransport

        p.transport = HTTPTransport(a.server)
    return p


def cmd_compile(a) -> int:
    from .evaluate import circuit_line

    p = _predictor(a)
    if a.force:
        from .fhe import compile_model

        p.compiled = compile_model(p.saved, p.compile_config, p.cache_dir, _say, force=True)
    compiled = p.ensure_compiled()
    report = compiled.report.to_dict()
    report.pop("files", None)
    if a.keygen:
        client = p.ensure_client()
        client.keygen()
        report.update(keygen_s=client.keygen_s, eval_key_bytes=len(client.evaluation_keys()))
    print(f"{p.saved.dataset}/{p.saved.name} -> {compiled.path}")
    print(circuit_line(report))
    if a.stability_images:
        from . import stability
        from .data import DataError

        cc = p.compile_config or p.saved.config.compile
        try:
            current = stability.check(p.saved, cc, _data_cfg(a), a.stability_images, compiled, p.cache_dir)
        except DataError as exc:
            _say(f"stability not measured: {exc}")
        else:
            proposal = None
            if not current.stable:
                proposal = stability.propose(p.saved, cc, _data_cfg(a), a.stability_images, p.cache_dir, _say)
            for line in stability.report_lines(current, proposal, tried=not current.stable):
                print(line)
            report["stability"] = current.to_dict()
            report["nearest_stable"] = proposal.to_dict() if proposal else None
    if a.json:
        Path(a.json).write_text(json.dumps(report, indent=2))
    return 0


def cmd_predict(a) -> int:
    import numpy as np

    from .data import load_split
    from .images import load_image
    from .metrics import label_text

    sub = None
    if not a.image:
        split = load_split(_data_cfg(a), a.split)
        bad = [i for i in a.index if not 0 <= i < len(split)]
        if bad:
            raise UserError(f"index {bad[0]} out of range: the {a.split} split has {len(split)} images (0..{len(split) - 1})")
        sub = split.subset(a.index)
    from . import guard as guards

    p = _predictor(a)
    info = p.info
    guard = guards.for_model(p.saved, _data_cfg(a))
    verdicts = {}
    if a.image:
        sharpness = guard.texture_median if guard is not None else None
        loaded = [load_image(Path(f), p.saved.config.data.size, info.n_channels, sharpness=sharpness) for f in a.image]
        images = np.stack([im.array for im in loaded])
        names, truth = list(a.image), [None] * len(a.image)
        if guard is None:
            _say("no input check: the model has no guard file and its dataset is not on this machine")
        else:
            for name, im in zip(names, loaded):
                v = guard.check(im.array, im.original)
                verdicts[name] = v
                if v.foreign:
                    print(f"warning: {name} does not look like a {p.saved.dataset} image: {v.message}")
    else:
        images, names = sub.images, [f"{a.split}[{i}]" for i in a.index]
        truth = [label_text(info, t) for t in sub.targets]
    bar, update = _bar("predicting")
    results = p.run(images, a.modes, progress=update)
    bar.close()
    out = []
    for i, name in enumerate(names):
        row = {"image": name, "true": truth[i]}
        for mode, r in results.items():
            row[mode] = {"label": label_text(info, r.predictions[i]), "probabilities": np.round(r.scores[i], 4).tolist(),
                         "latency_s": round(float(r.latency_s[i]), 5)}
            for k, v in r.stages.items():
                row[mode][k] = round(float(v[i]), 5)
        conf_text = ""
        if guard is not None:
            last = results[list(results)[-1]]
            c = guard.confidence(last.logits[i])
            row["confidence"] = round(c.top, 4)
            row["uncertain"] = c.uncertain
            conf_text = f"  confidence {100 * c.top:.0f}%" + (" (uncertain)" if c.uncertain else "")
        if name in verdicts:
            row["foreign_input"] = verdicts[name].foreign
            row["warning"] = verdicts[name].message
        out.append(row)
        truth_text = f"true={row['true']}  " if row["true"] is not None else ""
        print(f"{name}: {truth_text}" + "  ".join(f"{m}={row[m]['label']} ({row[m]['latency_s'] * 1000:.1f} ms)" for m in results)
              + conf_text)
    if "fhe" in results:
        fhe = results["fhe"]
        print(f"fhe sizes: ciphertext {fhe.sizes['ciphertext_bytes']:,} B, result {fhe.sizes['result_bytes']:,} B, "
              f"evaluation keys {fhe.sizes['eval_key_bytes']:,} B; keygen {p.client.keygen_s:.2f} s")
    if a.json:
        Path(a.json).write_text(json.dumps(out, indent=2))
    return 0


def cmd_evaluate(a) -> int:
    from .data import load_split
    from .evaluate import evaluate, table, write_json

    if a.images:
        return _validate_images(a)
    if a.label_map:
        raise UserError("--label-map goes with --images")
    p = _predictor(a)
    split = load_split(_data_cfg(a), a.split).head(a.limit)
    bar, update = _bar("evaluating")
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


def _validate_images(a) -> int:
    from . import guard as guards
    from . import validate
    from .evaluate import write_json

    if a.backend or a.batch_size > 1:
        raise UserError("--images runs the upload path one image at a time: drop --backend and --batch-size")
    p = _predictor(a)
    files = validate.read_labelled(Path(a.images), p.info, validate.parse_label_map(a.label_map))
    guard = guards.for_model(p.saved, _data_cfg(a))
    if guard is None:
        _say("no input check and no calibration: the model has no guard file and its dataset is not on this machine")
    bar, update = _bar("validating")
    report = validate.validate(p, guard, files, a.modes, progress=update, source=a.images)
    bar.close()
    print(validate.table(report))
    if a.json:
        write_json(report, Path(a.json))
        print(f"wrote {a.json}")
    return 0


def cmd_bench(a) -> int:
    from . import bench

    p = _predictor(a)
    bar, update = _bar("benchmark")
    batch = bench.BATCH_SIZE if a.batch_size is None else a.batch_size
    report = bench.run_bench(p, _data_cfg(a), a.limit, a.throughput_images, a.backend, a.scheduler, batch,
                             a.defaults_cap, a.defaults_images, say=_say, progress=update)
    bar.close()
    variant = None if p.compile_config == p.saved.config.compile else bench.variant_name(p.compile_config)
    jpath, mpath = bench.write(report, Path(a.out) if a.out else None, variant)
    print(bench.markdown(report))
    print(f"wrote {jpath} and {mpath}")
    return 0


def cmd_search(a) -> int:
    import itertools

    from .data import dataset_info, locate
    from .evaluate import results_dir, write_json
    from .sweep import add_shifted, choose, merge_points, pareto_figure, pareto_front, point_label, run_grid, score

    dataset_info(a.dataset)
    data = _data_cfg(a)
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
    bar, update = _bar("search")
    rows = run_grid(configs, 0, a.n_fhe, None, update)
    bar.close()
    out = Path(a.out) if a.out else results_dir()
    out.mkdir(parents=True, exist_ok=True)
    if a.merge and (out / f"{data.dataset}_search.json").exists():
        # Earlier searches' points stay on the front and in the choice.
        n = len(rows)
        rows = merge_points(json.loads((out / f"{data.dataset}_search.json").read_text())["points"], rows)
        _say(f"merged with {len(rows) - n} points of earlier searches")

    bar, update = _bar("framing shift")
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
        _say(f"PNG export failed ({type(exc).__name__}: {exc}); the HTML plot was written")
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
    return 0


def _bit_list(text: str) -> list[int]:
    out = []
    for part in text.split(","):
        lo, _, hi = part.partition("-")
        out += list(range(int(lo), int(hi or lo) + 1))
    if not out or min(out) < 1 or max(out) > 16:
        raise UserError(f"bit-widths must be between 1 and 16: {text!r}")
    return sorted(set(out))


def cmd_sweep(a) -> int:
    """Every point trains the saved model's recipe at one bit-width, compiles it at each rounding
    setting and measures it on validation (the test split is not touched)."""
    from . import registry
    from .evaluate import results_dir, write_json
    from .sweep import sweep, sweep_table

    saved = registry.load(a.dataset, a.model, a.models_dir)
    base = saved.config.replace(data=_data_cfg(a))
    if a.epochs:
        base = base.replace(train=dataclasses.replace(base.train, epochs=a.epochs))
    bits = _bit_list(a.bits)
    bar, update = _bar("sweep")
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


def cmd_serve(a) -> int:
    from .service import serve

    cfg = ServiceConfig(models_dir=a.models_dir or "", cache_dir=a.cache_dir or "", key_store_bytes=a.key_store_bytes,
                        key_ttl_s=a.key_ttl, workers=a.workers, max_queue=a.max_queue, backend=a.backend,
                        scheduler=a.scheduler, batch_size=a.batch_size)
    serve(cfg, a.host, a.port, say=_say)
    return 0


def cmd_loadtest(a) -> int:
    from .evaluate import write_json
    from .loadtest import run_loadtest

    r = run_loadtest(a.server, a.clients, a.requests, a.dataset, a.model, say=_say)
    ms = lambda v: "-" if v is None else f"{1000 * v:.0f} ms"  # noqa: E731
    print(f"{r['clients']} clients x {r['requests']} requests: {r['completed']} answered, {r['errors']} errors, "
          f"p50 {ms(r['latency_p50_s'])}, p95 {ms(r['latency_p95_s'])}, max {ms(r['latency_max_s'])}, "
          f"{r['throughput_rps']:.2f} req/s, first request {ms(r['first_request_latency_s'])}, "
          f"key re-uploads {r['key_reuploads']}, server RSS peak {r['server_rss_peak_bytes'] / 2**20:.0f} MiB")
    if a.json:
        write_json(r, Path(a.json))
        print(f"wrote {a.json}")
    return 0 if r["errors"] == 0 else 1


def cmd_models(a) -> int:
    from . import registry

    models = registry.list_models(a.dataset, a.models_dir)
    if not models:
        print("no saved models")
    for m in models:
        s = m.summary()
        print(f"{s['dataset']:<16} {s['name']:<44} hidden={s['hidden']} bits={s['bits (w/a/in)']} "
              f"val_acc={s['val_accuracy'] or 0:.4f} test_acc={s['test_accuracy'] or 0:.4f} {s['created']}")
    return 0


def _user_errors() -> tuple[type, ...]:
    """Exceptions that mean "the input or the setup is wrong": one line, exit code 2. Taken only
    from the modules this command imported: importing engine.data (medmnist, hence torch) just
    for its error class would cost ``serve`` about 500 MB of resident memory."""
    out: list[type] = [UserError, FileExistsError, ValueError]
    for module, name in [("engine.data", "DataError"), ("engine.images", "ImageError"),
                         ("engine.client", "ServiceUnavailable"), ("engine.registry", "ModelNotFound")]:
        if module in sys.modules:
            out.append(getattr(sys.modules[module], name))
    return tuple(out)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return {"train": cmd_train, "compile": cmd_compile, "predict": cmd_predict,
                "evaluate": cmd_evaluate, "bench": cmd_bench, "search": cmd_search, "sweep": cmd_sweep, "models": cmd_models,
                "serve": cmd_serve, "loadtest": cmd_loadtest}[args.command](args)
    except Exception as exc:  # noqa: BLE001 - user errors get one line, anything else its traceback
        if not isinstance(exc, _user_errors()):
            raise
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
